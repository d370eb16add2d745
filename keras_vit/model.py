"""VisionTransformer: the functional keras.Model of one ViTConfig (paper Eq. 1-4), and get_config."""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import keras
from keras import layers

from keras_vit import precision
from keras_vit.config import ViTConfig
from keras_vit.layers import (
    ClassToken,
    MAPHead,
    PatchEmbedding,
    PatchGrid,
    PatchTokens,
    PositionEmbedding,
    RegisterTokens,
    TokenPooling,
    TransformerBlock,
    fusion,
    preprocessing_scale_offset,
)
from keras_vit.layers.attention import LORA_TARGETS
from keras_vit.resnet import EPSILONS, ResNetStem
from keras_vit.train import (
    schedules,  # noqa: F401  (registers WarmupCosine, named by compiled .keras files)
    towers,
    updates,
)

# Before the first model's variables start TensorFlow's runtime: its thread counts for the towers (train.towers),
# for the policy set so far (again in VisionTransformer: the Zen 5's towers wait for a bf16 policy).
towers.configure(keras.config.dtype_policy().name)


def _model_name(cfg: ViTConfig) -> str:
    """A name TensorFlow accepts in graphs and exports: letters, digits and underscores only."""
    base = cfg.variant or f"D{cfg.hidden_size}_L{cfg.num_layers}_P{cfg.patch_size[0]}"
    return "vit_" + re.sub(r"[^0-9a-zA-Z_]+", "_", base).strip("_").lower()


# tf.image.resize's methods: what keras_vit.data.prepare_image resizes image files with.
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")


def _eval_preprocessing(pre: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A model's evaluation transform, checked: interpolation (a name) and crop_pct in (0, 1]."""
    if not pre:
        return None
    unknown = sorted(set(pre) - {"interpolation", "crop_pct"})
    if unknown:
        raise ValueError(f"eval_preprocessing takes interpolation and crop_pct, got {unknown}")
    method = pre.get("interpolation")
    if method is not None and method not in RESIZE_METHODS:
        raise ValueError(f"eval_preprocessing interpolation must be one of {', '.join(RESIZE_METHODS)}, got {method!r}")
    crop = pre.get("crop_pct")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
        raise ValueError(f"eval_preprocessing crop_pct must be in (0, 1], got {crop!r}")
    return {k: (float(v) if k == "crop_pct" else str(v)) for k, v in pre.items() if v is not None}


@keras.saving.register_keras_serializable(package="keras_vit")
class VisionTransformer(towers.TowerModel):
    """The functional graph of Eq. 1-4 for one ViTConfig; a plain keras.Model whose
    get_config() is the ViTConfig, so save/load rebuilds the same graph by name."""

    def __init__(self, config: Union[ViTConfig, dict], name: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, dtype=None,
                 quantized: Optional[Dict[str, str]] = None, eval_preprocessing: Optional[Dict[str, Any]] = None,
                 frozen_layers: Optional[Sequence[str]] = None, compiled_backend: Optional[str] = None,
                 lora_merged: bool = False, **kwargs):
        """`dtype`: the dtype policy (default: the global one); `quantized`: {layer path: dtype
        policy name} of layers that model.quantize() converted (what get_config records);
        `eval_preprocessing`: the resize and centre crop of image files for evaluation and
        prediction ({"interpolation": ..., "crop_pct": ...}, a published checkpoint's timm transform);
        `frozen_layers`: the paths of the layers whose `trainable` is False; `compiled_backend`: the
        backend that compiled the model saved (what get_config records for compile_from_config);
        `lora_merged`: saved with LoRA factors merged into its kernels (compile_from_config says why
        it does not restore the optimizer)."""
        cfg = config if isinstance(config, ViTConfig) else ViTConfig.from_dict(dict(config))
        cfg.validate()
        policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
        towers.configure(policy.name)  # before its variables start TensorFlow (a no-op once started)
        inputs, outputs = _build_graph(cfg, policy.name)
        super().__init__(inputs, outputs, name=name or _model_name(cfg), **kwargs)
        self.dtype_policy = policy  # the functional constructor ignores dtype=
        self.vit_config = cfg
        # The head's class names (e.g. ImageNet's for a published in1k checkpoint), saved with the model.
        self.class_names = list(class_names) if class_names else None
        self.eval_preprocessing = _eval_preprocessing(eval_preprocessing)
        if quantized:
            self._requantize(quantized)
        if frozen_layers:
            self._refreeze(frozen_layers)
        self._compiled_backend = compiled_backend
        self._lora_merged = bool(lora_merged)

    def call(self, inputs, training=None, mask=None, **kwargs):
        """The graph, after `_check_images` on the images it is called on (channels; a dynamic_size model's size)."""
        self._check_images(inputs)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def fit(self, x=None, *args, **kwargs):
        self._check_images(x)
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_images(x)
        return super().evaluate(x, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check_images(x)
        return super().predict(x, *args, **kwargs)

    def _check_images(self, x) -> None:
        """Images (an array, a tensor or a tf.data.Dataset's first element) whose shape is known, against
        the model: their channels (Keras' input check lets (B, H, W, 1) into a 3-channel model, and the
        patch embedding failed on a reshape), and a dynamic_size model's height and width against
        `ViTConfig.check_image_size` (one clear ValueError instead of a shape error in the patch
        embedding, and no pixels dropped unless patch_remainder='drop' says so; a hybrid takes any size,
        its ResNet pads, as timm's dynamic_img_size). Traced steps see the size at their first trace."""
        cfg = getattr(self, "vit_config", None)
        spec = getattr(x, "element_spec", None)
        if spec is not None:
            x = spec[0] if isinstance(spec, (tuple, list)) else spec
        shape = getattr(x, "shape", None)
        if cfg is None or shape is None or len(shape) != 4:
            return
        if shape[3] is not None and int(shape[3]) != cfg.channels:
            raise ValueError(f"the images have {int(shape[3])} channels (shape {tuple(shape)}); this model takes "
                             f"{cfg.channels} (built with channels={cfg.channels})")
        if cfg.dynamic_size and cfg.resnet_layers is None and shape[1] is not None and shape[2] is not None:
            cfg.check_image_size(int(shape[1]), int(shape[2]), what="the images' size")

    def _refreeze(self, frozen: Sequence[str]) -> None:
        """Give each layer the `trainable` flag it was saved with (`frozen`: the paths of those that were not), as a
        functional model's layer configs do: a linear probe reloads with its backbone frozen and its optimizer state."""
        frozen = set(frozen)
        layers_by_key = {_layer_key(layer): layer for layer in _weighted_layers(self)}
        unknown = sorted(frozen - set(layers_by_key))
        if unknown:
            raise ValueError(f"frozen layers {unknown} are not in this model")
        for key, layer in layers_by_key.items():  # parents before their sublayers: a sublayer's own flag wins
            layer.trainable = key not in frozen

    def _requantize(self, quantized: Dict[str, str]) -> None:
        """Give the named layers their quantized policy and variables (values come from the file)."""
        layers_by_path = {layer.path: layer for layer in self._flatten_layers(include_self=False)}
        unknown = sorted(set(quantized) - set(layers_by_path))
        if unknown:
            raise ValueError(f"quantized layers {unknown} are not in this model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras' notes on the float kernels it replaces
            for path, policy_name in quantized.items():
                policy = keras.dtype_policies.get(policy_name)
                mode = policy.quantization_mode
                config = keras.quantizers.Int4QuantizationConfig(block_size=policy.block_size) if mode == "int4" else None
                layers_by_path[path].quantize(mode, config=config)

    def forward_intermediates(self, images, attention: bool = False,
                              patch_transform: Optional[Callable] = None) -> Dict[str, Any]:
        """The encoder's intermediate outputs on `images` (a tensor, or a keras.Input to build a
        new functional model on this model's layers, which share its weights):

        - "blocks": every encoder block's output z_l, (B, S, D) with the prefix tokens (class,
          distillation, registers: `vit_config.num_prefix_tokens`) first;
        - "attention" (with `attention=True`): every block's attention probabilities
          (B, heads, S, S), rows summing to 1 (the softmax of Eq. 5, before attention dropout);
        - "tokens": LN(z_L) (z_L itself with fc_norm, whose LayerNorm follows the pooling), the
          (B, S, D) sequence that output="tokens" returns (absent for a feature_layers model,
          whose graph stops at its last feature block).

        `patch_transform` maps the patch embeddings (B, N, D) before the class token and the
        position embeddings are added (masked patch prediction corrupts them there). The model
        itself and its exported graph are unchanged: this runs its layers again.
        """
        cfg = self.vit_config
        self._check_images(images)
        blocks, probs = _encode(cfg, images, lambda name, make: self.get_layer(name), _depth(cfg),
                                attention=attention, patch_transform=patch_transform)
        out: Dict[str, Any] = {"blocks": blocks}
        if attention:
            out["attention"] = probs
        if not cfg.feature_layers:
            out["tokens"] = blocks[-1] if cfg.fc_norm else self.get_layer("encoder_norm")(blocks[-1])
        return out

    def distillation_logits(self, images, training: bool = False):
        """(logits of the class-token head, logits of the distillation head) of a distilled model
        (DeiT): the pair a distillation loss trains; the model's own output is their mean."""
        cfg = self.vit_config
        if not (cfg.distilled and cfg.include_top):
            raise ValueError(f"distillation_logits needs a model built with distilled=True and include_top=True, "
                             f"got distilled={cfg.distilled} and include_top={cfg.include_top}")
        self._check_images(images)
        heads = towers.TowerModel(self.input, [self.get_layer("head").output, self.get_layer("head_dist").output])
        cls_logits, dist_logits = heads(images, training=training)
        return cls_logits, dist_logits

    def enable_lora(self, rank: int, alpha: Optional[float] = None,
                    targets: Sequence[str] = LORA_TARGETS) -> int:
        """keras-hub's `Backbone.enable_lora`: LoRA of `rank` on every block's `targets` (keras_vit.enable_lora)."""
        from keras_vit.weights.lora import enable_lora

        return enable_lora(self, rank, alpha, targets)

    def save_lora_weights(self, filepath: str) -> str:
        """keras-hub's `Backbone.save_lora_weights`: the LoRA factors alone, to a `.lora.npz` file."""
        from keras_vit.weights.lora import save_lora_weights

        return save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath: str) -> None:
        """keras-hub's `Backbone.load_lora_weights`: a `save_lora_weights` file's factors, LoRA enabled where needed."""
        from keras_vit.weights.lora import load_lora_weights

        load_lora_weights(self, filepath)

    @property
    def compiled(self) -> bool:
        """Keras' flag; False after a load that declined the saved compile state (compile_from_config),
        which Keras' deserializer marks compiled whatever compile_from_config did."""
        return self.__dict__.get("_compiled_flag", False) and not self.__dict__.get("_compile_declined", False)

    @compiled.setter
    def compiled(self, value: bool) -> None:
        self.__dict__["_compiled_flag"] = bool(value)

    def compile(self, *args, **kwargs) -> None:
        """keras.Model.compile; `jit_compile="auto"` (the default) picks what is fast for a ViT on
        this hardware and precision policy (keras_vit.precision.model_jit_compile)."""
        self.__dict__["_compile_declined"] = False
        backend = keras.backend.backend()
        if self.dtype_policy.name == "mixed_float16" and backend == "jax":  # one line here, not XLA's at the first step
            precision.check_policy(self.dtype_policy.name, backend, precision.detect_hardware(backend))
        self._jit_auto = len(args) < 8 and kwargs.get("jit_compile", "auto") == "auto"  # 8th positional: jit_compile
        run_eagerly = args[5] if len(args) > 5 else kwargs.get("run_eagerly", False)  # 6th positional
        if self._jit_auto and run_eagerly:
            kwargs["jit_compile"] = False  # eager steps: nothing to compile (Keras warns of an explicit True)
        elif self._jit_auto:
            # a process running towers (train.towers) keeps graph mode: XLA's whole step would run on one thread
            # (0.65x at Ti/16 float32 on the Zen 5 after a bf16 model started its towers)
            kwargs["jit_compile"] = precision.model_jit_compile(
                self.dtype_policy.name, backend, precision.detect_hardware(backend)) and towers.count() < 2
        if kwargs.get("jit_compile") is True and towers.count() > 1:
            warnings.warn("this process runs TensorFlow's ops on one thread each (keras_vit.train.towers), so a step "
                          "XLA-compiled whole runs on one core (0.62x at Ti/16 on the AMX Xeon): set KERAS_VIT_TOWERS=0 "
                          "before importing keras_vit to keep TensorFlow's threads", stacklevel=2)
        super().compile(*args, **kwargs)

    def train_step(self, *args, **kwargs):
        """Keras' own, traced knowing whether the step is XLA-compiled whole: on an AMX CPU float32 then keeps
        TensorFlow's own forms, and in graph mode takes the scoped step's (keras_vit.layers.fusion.float32_scoped)
        and Keras' SGD/Adam/AdamW updates as TensorFlow's fused ops (keras_vit.train.updates)."""
        if keras.backend.backend() != "tensorflow":  # both are TensorFlow's (and torch.compile traces no context manager)
            return super().train_step(*args, **kwargs)
        whole_step_xla = self.jit_compile is True
        with fusion.whole_step_xla(whole_step_xla), updates.fused_updates(self.optimizer, whole_step_xla):
            return super().train_step(*args, **kwargs)  # the batch as towers where this process runs them (train.towers)

    def get_compile_config(self) -> Optional[dict]:
        """Keras' own, with "auto" kept as the jit_compile asked for (resolved again where the model
        loads); Keras' compile() takes it as it is (keras.models.clone_model's functional copy)."""
        config = super().get_compile_config()
        if config and self.compiled and getattr(self, "_jit_auto", False):  # {}: never compiled, loads uncompiled
            config = {**config, "jit_compile": "auto"}
        return config

    def compile_from_config(self, config: dict) -> None:
        """Keras' own, which skips a model whose compile() is overridden (this one's): a compiled
        model saved to .keras loads compiled, its optimizer's state included. On another backend
        than the one that saved it, jit_compile is "auto" (XLA's choice for TensorFlow is
        torch.compile's on PyTorch) and the optimizer is Keras' public one (PyTorch saves its own)."""
        if self._lora_merged:  # the optimizer's state is the factors', which the file no longer has
            self.__dict__["_compile_declined"] = True  # Keras' deserializer then sets compiled = True: not so
            warnings.warn(f"model {self.name!r} was saved during LoRA fine-tuning: its LoRA factors are merged into "
                          "the kernels, so the optimizer's state (theirs) cannot be restored and the model loads "
                          "uncompiled; compile it (after keras_vit.enable_lora or lora_finetune, to go on with "
                          "LoRA) to train on", stacklevel=2)
            return
        config = dict(config)
        # the backend that compiled it: get_config's (a file of 2026-11/12 has it here); None: older than both
        if (config.pop("backend", None) or self._compiled_backend) != keras.backend.backend():
            config["jit_compile"] = "auto"
        config = keras.saving.deserialize_keras_object(_public_optimizers(config))
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self) -> dict:
        """The ViTConfig as a dict, the model's name, class names and dtype policy, the policies of the
        layers model.quantize() converted and the frozen layers: all that rebuilds the model."""
        out = {"config": self.vit_config.to_dict(), "name": self.name, "trainable": self.trainable,
               "dtype": self.dtype_policy.name}
        if self.class_names:
            out["class_names"] = [str(n) for n in self.class_names]
        if self.eval_preprocessing:
            out["eval_preprocessing"] = dict(self.eval_preprocessing)
        quantized = {layer.path: layer.dtype_policy.name for layer in self._flatten_layers(include_self=False)
                     if layer.dtype_policy.quantization_mode is not None}
        if quantized:
            out["quantized"] = quantized
        frozen = [_layer_key(layer) for layer in _weighted_layers(self) if not layer.trainable]
        if frozen:
            out["frozen_layers"] = frozen
        if any(getattr(layer, "lora_enabled", False) for layer in self._flatten_layers(include_self=False)):
            out["lora_merged"] = True  # model.save merges the factors into the kernels
        if self.compiled:  # its explicit jit_compile holds on this backend only (compile_from_config)
            out["compiled_backend"] = keras.backend.backend()
        return out

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The model for a get_config() dict."""
        return cls(**config)


def _weighted_layers(model: keras.Model) -> List[layers.Layer]:
    """The layers of `model` that hold variables, parents before their sublayers: those whose names are
    the model's own (a dropout layer's name is numbered by the process that built it)."""
    return [layer for layer in model._flatten_layers(include_self=False) if layer.weights]


def _layer_key(layer: layers.Layer) -> str:
    """A layer's path in the model (its name where Keras gives it none: the top-level layers)."""
    return layer.path or layer.name


def _public_optimizers(config: Any) -> Any:
    """`config` with each optimizer of a backend's own module (PyTorch's `keras.src.backend.torch.
    optimizers.torch_adamw`, named in files it saves) as `keras.optimizers`' class of that name, which
    every backend builds as its own."""
    if isinstance(config, dict):
        config = {k: _public_optimizers(v) for k, v in config.items()}
        if str(config.get("module", "")).startswith("keras.src.backend.") and \
                hasattr(keras.optimizers, str(config.get("class_name"))):
            config = {**config, "module": "keras.optimizers", "registered_name": None}
    elif isinstance(config, list):
        config = [_public_optimizers(v) for v in config]
    return config


@keras.saving.register_keras_serializable(package="keras_vit")
class BlockAttention(layers.Layer):
    """An encoder block that returns (tokens, attention probabilities), for functional models
    built on a model's layers: Keras' functional graph takes every call of a layer to have
    the outputs of its first call, and the model's own call of each block has one."""

    def __init__(self, block: TransformerBlock, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, x, return_attention_scores: bool = True):
        return self.block(x, return_attention_scores=True)

    def compute_output_spec(self, x, return_attention_scores: bool = True):
        return self.block.compute_output_spec(x, return_attention_scores=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "block": keras.saving.serialize_keras_object(self.block)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)


# How a layer of the graph is obtained: built new (the model's constructor) or looked up in a model.
LayerSource = Callable[[str, Callable[[], layers.Layer]], layers.Layer]


def _encode(cfg: ViTConfig, images, layer: LayerSource, depth: int, dtype: Optional[str] = None,
            attention: bool = False, patch_transform: Optional[Callable] = None, head_tokens: Optional[int] = None):
    """Eq. 1-3 up to encoder block `depth - 1`: (block outputs z_1..z_depth (B, S, D), their
    attention probabilities (B, heads, S, S) when `attention`, else []).

    The one definition of the encoder: the constructor runs it to build the graph and
    `VisionTransformer.forward_intermediates` runs it again on the model's own layers.
    `patch_transform` is applied to the patch embeddings (B, N, D) before the class token and
    position embeddings are added (masked patch prediction corrupts them there). With
    `head_tokens` n the last block computes the first n tokens' outputs only, (B, n, D).
    The sequence is [class?, distillation?, registers*, patches]; the registers are inserted
    after the position embeddings, which they do not have (DINOv2 with registers), or before them
    with `register_pos_embedding` (their rows in the table).
    """
    x = images
    if cfg.include_preprocessing:
        # [0, 255] -> (x / 255 - mean) / std; by default [-1, 1], the official checkpoints' input range.
        scale, offset = preprocessing_scale_offset(cfg.pixel_mean, cfg.pixel_std)
        x = layer("preprocessing", lambda: layers.Rescaling(scale, offset=offset, name="preprocessing",
                                                             dtype=dtype))(x)
    if cfg.resnet_layers is not None:
        x = layer("resnet", lambda: ResNetStem(cfg.resnet_layers, width=cfg.resnet_width, name="resnet",
                                               dtype=dtype, **EPSILONS[cfg.resnet_epsilons]))(x)
    x = layer("embedding", lambda: PatchEmbedding(cfg.hidden_size, cfg.patch_size, name="embedding", dtype=dtype))(x)
    if patch_transform is not None:
        x = patch_transform(x)
    if cfg.distilled:  # prepended first, so that it follows the class token
        x = layer("dist", lambda: ClassToken(name="dist", dtype=dtype))(x)
    if cfg.has_class_token:
        x = layer("cls", lambda: ClassToken(name="cls", dtype=dtype))(x)
    prefix = cfg.num_pos_prefix_tokens
    # Registers sit after the class and distillation tokens; before the position embeddings when they
    # have rows there (register_pos_embedding), else after them.
    reg_index = cfg.num_prefix_tokens - cfg.num_registers
    if cfg.num_registers and cfg.register_pos_embedding:
        x = layer("reg", lambda: RegisterTokens(cfg.num_registers, reg_index, name="reg", dtype=dtype))(x)
    pos_kind = "none" if cfg.pos_embedding == "relative" else cfg.pos_embedding
    if cfg.dynamic_size:  # the patch grid comes from the images' shape at run time
        x = layer("posembed_input", lambda: PositionEmbedding(
            pos_kind, cfg.grid_size, num_prefix_tokens=prefix, stride=cfg.input_stride,
            method=cfg.pos_interpolation, padded_stride=cfg.resnet_stride, name="posembed_input",
            dtype=dtype))(x, images=images)
    else:
        x = layer("posembed_input", lambda: PositionEmbedding(pos_kind, cfg.grid_size, num_prefix_tokens=prefix,
                                                              name="posembed_input", dtype=dtype))(x)
    if cfg.num_registers and not cfg.register_pos_embedding:
        x = layer("reg", lambda: RegisterTokens(cfg.num_registers, reg_index, name="reg", dtype=dtype))(x)
    x = layer("dropout", lambda: layers.Dropout(cfg.dropout_rate, name="dropout", dtype=dtype))(x)
    if cfg.pre_norm:
        x = layer("pre_norm", lambda: layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="pre_norm",
                                                                dtype="float32"))(x)
    relative_grid = cfg.grid_size if cfg.pos_embedding == "relative" else None
    blocks, probs = [], []
    for i in range(depth):
        # Stochastic depth grows linearly with depth (timm, big_vision).
        dpr = cfg.drop_path_rate * i / max(cfg.num_layers - 1, 1)
        block = layer(f"encoderblock_{i}", lambda i=i, dpr=dpr: TransformerBlock(
            cfg.num_heads, cfg.mlp_dim, cfg.dropout_rate, cfg.attention_dropout_rate, dpr, cfg.gelu_approximate,
            cfg.layer_norm_epsilon, relative_grid=relative_grid, num_prefix_tokens=cfg.num_prefix_tokens,
            layer_scale_init=cfg.layer_scale_init, qk_norm=cfg.qk_norm, activation=cfg.activation, mlp_kind=cfg.mlp,
            qkv_bias=cfg.qkv_bias,
            name=f"encoderblock_{i}", dtype=dtype))
        if attention:
            if isinstance(x, keras.KerasTensor):  # a node of its own, with two outputs
                block = BlockAttention(block, name=f"{block.name}_attention", dtype=block.dtype_policy)
            x, a = block(x, return_attention_scores=True)
            probs.append(a)
        elif head_tokens and i == depth - 1:
            x = block(x, num_queries=head_tokens)
        else:
            x = block(x)
        blocks.append(x)
    return blocks, probs


def _depth(cfg: ViTConfig) -> int:
    """Encoder blocks in the graph: a features model stops after the last block it returns."""
    return max(cfg.feature_layers) + 1 if cfg.feature_layers else cfg.num_layers


def _build_graph(cfg: ViTConfig, dtype: Optional[str] = None):
    """(inputs, outputs) of the encoder and head for `cfg`, under the dtype policy named `dtype`
    (a name, which every layer's config can hold; the LayerNorms, pre-logits and head always
    compute in float32)."""
    h, w = cfg.image_size
    inputs = keras.Input((None, None, cfg.channels) if cfg.dynamic_size else (h, w, cfg.channels), name="images")
    # A class-token head reads token 0 of the last block alone (a distilled one tokens 0 and 1): that
    # block computes nothing else ("gap" and "map" read all tokens).
    reads_prefix = cfg.classifier == "token" and not cfg.feature_layers and cfg.output != "tokens"
    head_tokens = (2 if cfg.distilled else 1) if reads_prefix else None
    blocks, _ = _encode(cfg, inputs, lambda name, make: make(), _depth(cfg), dtype, head_tokens=head_tokens)
    if cfg.feature_layers:  # a dict: Keras would unwrap a list of one
        return inputs, {f"block_{i}": PatchGrid(cfg.grid_size, cfg.num_prefix_tokens, name=f"features_{i}",
                                                dtype=dtype)(blocks[i])
                        for i in cfg.feature_layers}
    x = blocks[-1]
    if not cfg.fc_norm:
        x = layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="encoder_norm", dtype="float32")(x)
    if cfg.output == "tokens":
        return inputs, x
    return inputs, _head(cfg, x, dtype)


def _head(cfg: ViTConfig, x, dtype: Optional[str]):
    """Pooling, fc_norm, pre-logits and head on the encoder's tokens. A distilled model pools the
    class and distillation tokens apart, through the same fc_norm and pre-logits, into `head` and
    `head_dist`, and returns their mean (logits, or features with include_top=False), as timm."""
    if cfg.classifier == "map":
        if not cfg.pool_include_prefix and cfg.num_prefix_tokens:  # timm >= 1.0: the patch tokens only
            x = PatchTokens(cfg.num_prefix_tokens, name="pool_patch_tokens", dtype=dtype)(x)
        pooled = [MAPHead(cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_epsilon, cfg.gelu_approximate,
                          activation=cfg.activation, name="pool", dtype=dtype)(x)]
    else:
        pooled = [TokenPooling(cfg.classifier, cfg.num_prefix_tokens, name="pool", dtype=dtype)(x)]
        if cfg.distilled:
            pooled.append(TokenPooling("token", index=1, name="pool_dist", dtype=dtype)(x))
    if cfg.fc_norm:
        norm = layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="fc_norm", dtype="float32")
        pooled = [norm(p) for p in pooled]
    if cfg.representation_size:
        pre_logits = layers.Dense(cfg.representation_size, activation="tanh", name="pre_logits", dtype="float32")
        pooled = [pre_logits(p) for p in pooled]
    if cfg.include_top:
        pooled = [layers.Dense(cfg.num_classes, kernel_initializer="zeros", name=name, dtype="float32")(p)
                  for name, p in zip(("head", "head_dist"), pooled)]
    if len(pooled) == 2:
        return layers.Average(name="distilled_mean", dtype="float32")(pooled)
    return pooled[0]


def build_model(cfg: ViTConfig, name: Optional[str] = None, dtype: Optional[str] = None) -> keras.Model:
    """A VisionTransformer for a config (validated first), under the dtype policy `dtype`
    (default: the global one)."""
    return VisionTransformer(cfg, name=name, dtype=dtype)


def get_config(model: keras.Model) -> ViTConfig:
    """The ViTConfig of a keras-vit model; ValueError for any other model."""
    cfg = getattr(model, "vit_config", None)
    if not isinstance(cfg, ViTConfig):
        raise ValueError(f"model {getattr(model, 'name', model)!r} is not a keras-vit model "
                         "(expected one built by keras_vit.ViT or loaded from its .keras file)")
    return cfg
