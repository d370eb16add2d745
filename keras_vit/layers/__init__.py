"""The ViT's building blocks as serialisable Keras layers (keras.ops only: TF, JAX and torch).

Names follow the paper (Eq. 1-4) and weights keep the layout of the official checkpoints,
so that loading a .npz is a copy: attention kernels are (D, heads, head_dim) and
(heads, head_dim, D).

The layers live by what they hold: embedding.py (patches, class, distillation and register
tokens, position embeddings, patch grid, token pooling), attention.py (multi-head self-attention),
block.py (the encoder block, MLP, drop path, LayerScale), norm.py (the blocks' float32 LayerNorm),
pooling.py (the MAP head's attention pooling). Importing this package registers every layer with
keras.saving under "keras_vit>ClassName", the names saved .keras files refer to.
"""
from keras_vit.layers.attention import MultiHeadSelfAttention, relative_position_index
from keras_vit.layers.block import DropPath, LayerScale, MlpBlock, TransformerBlock, activate
from keras_vit.layers.embedding import (
    ClassToken,
    PatchEmbedding,
    PatchGrid,
    PatchTokens,
    PositionEmbedding,
    RegisterTokens,
    TokenPooling,
    interpolation_matrix_ops,
    preprocessing_scale_offset,
    sincos_2d,
    sincos_2d_ops,
)
from keras_vit.layers.norm import _layer_norm
from keras_vit.layers.pooling import MAPHead

__all__ = ["PatchEmbedding", "ClassToken", "RegisterTokens", "PositionEmbedding", "PatchGrid", "PatchTokens", "TokenPooling",
           "MAPHead", "preprocessing_scale_offset", "MultiHeadSelfAttention",
           "MlpBlock", "LayerScale", "activate", "DropPath", "TransformerBlock", "sincos_2d", "sincos_2d_ops",
           "interpolation_matrix_ops",
           "relative_position_index", "_layer_norm"]
