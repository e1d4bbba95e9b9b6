"""peft LoRA on packed BitNet layers, with plain ``peft`` / ``trl`` calls.

:class:`PackedBitLinearLoraLayer` is the LoRA layer peft puts around a frozen
:class:`~bitnet_torch.nn.PackedBitLinear`: ``y = packed(x) + lora_B(lora_A(dropout(x))) * scaling`` (peft's own
``lora.Linear`` forward; the adapter runs in float on the un-quantized input, the base in ternary x int8).

:func:`register_peft_support` (called once when :mod:`bitnet_torch.models` is imported, i.e. by
``import bitnet_torch``) teaches peft about ``PackedBitLinear`` so that the calls users already write work on a
packed model, with a plain ``LoraConfig`` and no custom-module registration of their own:

* ``LoraConfig(target_modules="all-linear")``: peft resolves ``all-linear`` to ``nn.Linear``/``Conv1D`` leaves;
  the packed projections (uint8 codes, no ``nn.Linear``) are added to that set (never the output head);
* named targets (``q_proj`` ... ``down_proj``) and ``target_modules=None`` (``model_type: bitnet`` defaults to
  the seven projections): a ``PackedBitLinear`` target is built as :class:`PackedBitLinearLoraLayer` through
  peft's custom-module mechanism (``LoraConfig._register_custom_module``), registered on the config being used
  unless the user mapped ``PackedBitLinear`` themselves;
* merging (``merge_and_unload``, ``merge_adapter``) of an adapter on a packed layer is refused before anything
  is changed (:class:`PackedMergeError`): ternary codes have no float master weights to merge into.

This covers every path that builds LoRA layers through peft's ``LoraModel`` -- ``get_peft_model``,
``SFTTrainer(peft_config=...)``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM.from_pretrained``,
``inject_adapter_in_model`` and Transformers' ``model.load_adapter`` -- because they all dispatch there. Other
peft methods (AdaLoRA, LoHa, VeRA, ...) have their own layer classes and do not support packed layers.

How it hooks in: peft has no public registry for layer types, so three functions of peft are wrapped
(idempotently, keeping the originals): ``LoraModel._create_new_module`` (register the packed layer on the config
before peft's dispatch), ``tuners_utils._maybe_include_all_linear_layers`` (add packed projections to
``all-linear``) and ``LoraModel._check_merge_allowed`` (refuse packed merges up front). Each wrapper only acts
on models that contain ``PackedBitLinear``; everything else reaches peft's code unchanged. ``model_type: bitnet``
gets the seven projections as peft's default LoRA targets, and ``bitnet_torch`` joins the allowlist of
``AutoPeftModel`` (it imports the base-model class named in an adapter saved without ``task_type`` only from
listed packages; ``bitnet_torch`` is already imported in any process where this runs, so importing it again
executes nothing new).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .packed import PackedBitLinear

__all__ = [
    "PACKED_MERGE_MESSAGE",
    "PackedBitLinearLoraLayer",
    "PackedMergeError",
    "PeftAdapterCompatMixin",
    "register_peft_support",
]

logger = logging.getLogger(__name__)

#: The seven ternary projections of a decoder layer (what LoRA adapts on ``model_type: bitnet`` by default).
_BITNET_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PACKED_MERGE_MESSAGE = (
    "cannot merge a LoRA adapter into a packed BitNet model: its projections hold 2-bit ternary codes, not float "
    "master weights, so there is nothing to add the update to (rounding it into the codes would silently change "
    "the model). Keep the adapter separate: use the PeftModel as it is, or save it with "
    "peft_model.save_pretrained(dir) and reload it on the packed base with PeftModel.from_pretrained / "
    "AutoPeftModelForCausalLM.from_pretrained(dir) / model.load_adapter(dir). To get a merged model, train the "
    "adapter on the float master checkpoint (BitNetForCausalLM.from_pretrained(master_dir), BitLinear "
    "projections) and call merge_and_unload() there: the update is added to the master weights, which are "
    "re-quantized to ternary in every forward and when saved with save_pretrained(dir, packed=True)."
)


class PackedMergeError(ValueError):
    """Merging a LoRA adapter into a packed (ternary-code) layer was asked for; see :data:`PACKED_MERGE_MESSAGE`."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(PACKED_MERGE_MESSAGE + (f" ({detail})" if detail else ""))


class PackedBitLinearLoraLayer(LoraLinear):
    """peft LoRA layer around a frozen :class:`~bitnet_torch.nn.PackedBitLinear`.

    Forward: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per active adapter (peft's ``lora.Linear``
    forward, unchanged: the adapter sees the un-quantized input, the base quantizes it to int8). The adapter is
    created in the base layer's model dtype (``weight_scale``'s), not the uint8 dtype of the packed codes.
    Merging is refused with :class:`PackedMergeError` (the base holds no float weights); DoRA and
    initialisations that read the base weights (PiSSA, OLoRA, EVA, LoftQ, ...) are refused for the same reason.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, PackedBitLinear):
            raise TypeError(f"PackedBitLinearLoraLayer wraps PackedBitLinear, got {type(base).__name__}")
        if kwargs.get("use_dora", getattr(config, "use_dora", False)):
            raise ValueError("DoRA needs the base weight matrix; a packed BitNet base has none (use_dora=False)")
        init = kwargs.get("init_lora_weights", getattr(config, "init_lora_weights", True))
        if isinstance(init, str) and init != "gaussian":
            raise ValueError(
                f"init_lora_weights={init!r} reads the base weights; a packed BitNet base only supports "
                "True/False/'gaussian'"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        return base_layer.weight_scale.device, base_layer.weight_scale.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise PackedMergeError()

    def unmerge(self) -> None:
        raise PackedMergeError("a LoRA adapter on a packed ternary layer is never merged")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in float (what the adapter adds to ``x @ W.T``); never applied to the codes."""
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]


# -- peft hooks ---------------------------------------------------------------------------------------------------

_WRAPPED = "_bitnet_torch_wrapped"


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _has_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedBitLinear) for m in model.modules())


def _packed_all_linear_names(model: nn.Module) -> set[str]:
    """Names of the packed projections ``all-linear`` should target (outside adapter internals, not the head)."""
    tuner_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {
        name
        for name, m in model.named_modules()
        if name and isinstance(m, PackedBitLinear) and m is not head and not name.startswith(tuner_prefixes)
    }


def _wrap_all_linear(original):
    def _maybe_include_all_linear_layers(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        wants_all_linear = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = original(peft_config, model)
        if wants_all_linear and _has_packed(model):
            packed = _packed_all_linear_names(model)
            peft_config.target_modules = set(peft_config.target_modules or ()) | packed
            logger.debug("all-linear: added %d packed BitNet projections", len(packed))
        return peft_config

    _maybe_include_all_linear_layers.__doc__ = original.__doc__
    _maybe_include_all_linear_layers.__wrapped__ = original
    setattr(_maybe_include_all_linear_layers, _WRAPPED, True)
    return _maybe_include_all_linear_layers


def _wrap_create_new_module(original):
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if isinstance(_base_of(target), PackedBitLinear):
            custom = getattr(lora_config, "_custom_modules", None) or {}
            if not any(issubclass(PackedBitLinear, key) for key in custom):
                lora_config._register_custom_module({PackedBitLinear: PackedBitLinearLoraLayer})
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original
    setattr(_create_new_module, _WRAPPED, True)
    return staticmethod(_create_new_module)


def _wrap_check_merge_allowed(original):
    def _check_merge_allowed(self):
        original(self)
        packed = [name for name, m in self.model.named_modules() if isinstance(m, PackedBitLinearLoraLayer)]
        if packed:
            raise PackedMergeError(f"{len(packed)} adapted packed layers, e.g. {packed[0]}")

    _check_merge_allowed.__wrapped__ = original
    setattr(_check_merge_allowed, _WRAPPED, True)
    return _check_merge_allowed


def _wrap_import_allowlist(original):
    def get_default_import_allowlist():
        allowlist = list(original())
        if "bitnet_torch" not in allowlist:
            allowlist.append("bitnet_torch")
        return allowlist

    get_default_import_allowlist.__wrapped__ = original
    setattr(get_default_import_allowlist, _WRAPPED, True)
    return get_default_import_allowlist


def register_peft_support() -> bool:
    """Make plain peft LoRA calls work on models with :class:`PackedBitLinear` projections (idempotent).

    Returns True when peft's hooks are in place, False (with a warning) when this peft version lacks one of the
    functions wrapped (then packed models need ``LoraConfig._register_custom_module`` and explicit targets).
    """
    from peft.tuners import tuners_utils
    from peft.tuners.lora import model as lora_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    lora_cls = lora_model.LoraModel
    missing = [
        name
        for name, owner in (
            ("_maybe_include_all_linear_layers", tuners_utils),
            ("_create_new_module", lora_cls),
            ("_check_merge_allowed", lora_cls),
        )
        if not hasattr(owner, name)
    ]
    if missing:
        logger.warning(
            "this peft version has no %s; plain LoRA calls on packed BitNet models are not hooked (register "
            "PackedBitLinearLoraLayer with LoraConfig._register_custom_module and name the targets)", missing
        )
        return False

    if not getattr(tuners_utils._maybe_include_all_linear_layers, _WRAPPED, False):
        wrapped = _wrap_all_linear(tuners_utils._maybe_include_all_linear_layers)
        tuners_utils._maybe_include_all_linear_layers = wrapped
        try:  # Transformers' v5 weight-conversion helper resolves all-linear through the same function
            from peft.utils import transformers_weight_conversion as conversion

            if hasattr(conversion, "_maybe_include_all_linear_layers"):
                conversion._maybe_include_all_linear_layers = wrapped
        except ImportError:
            pass
    create = inspect.getattr_static(lora_cls, "_create_new_module")
    create = create.__func__ if isinstance(create, staticmethod) else create
    if not getattr(create, _WRAPPED, False):
        lora_cls._create_new_module = _wrap_create_new_module(create)
    if not getattr(lora_cls._check_merge_allowed, _WRAPPED, False):
        lora_cls._check_merge_allowed = _wrap_check_merge_allowed(lora_cls._check_merge_allowed)
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("bitnet", list(_BITNET_PROJECTIONS))
    try:  # AutoPeftModel imports the base class named in an adapter saved without task_type only from an allowlist
        from peft import auto

        if hasattr(auto, "get_default_import_allowlist") and not getattr(
            auto.get_default_import_allowlist, _WRAPPED, False
        ):
            auto.get_default_import_allowlist = _wrap_import_allowlist(auto.get_default_import_allowlist)
    except ImportError:
        pass
    return True


# -- Transformers' adapter methods on our models -------------------------------------------------------------------


def _peft_version_below(minimum: str) -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("peft")) < Version(minimum)


#: Transformers' PEFT integration gates its adapter methods on this peft version (``MIN_PEFT_VERSION``).
_TRANSFORMERS_MIN_PEFT = "0.22.0"


class PeftAdapterCompatMixin:
    """Transformers' adapter methods (``active_adapters``, ``set_adapter``, ``enable_adapters``,
    ``disable_adapters``, ``get_adapter_state_dict``, ``add_adapter``, ``delete_adapter``) on peft versions that
    Transformers' own integration refuses.

    Transformers >= 5.24 gates these methods on peft >= 0.22 although what they do -- walk the model's
    ``BaseTunerLayer`` modules, or call ``get_peft_model_state_dict`` / ``inject_adapter_in_model`` /
    ``peft.functional.delete_adapter`` -- exists in the peft we support (>= 0.21.2). With such a peft these
    methods run that same logic here; with peft >= 0.22 they are Transformers' own (``super()``).
    ``load_adapter`` itself is not gated and is Transformers' own in both cases.
    """

    def _bitnet_needs_peft_compat(self) -> bool:
        if not _peft_version_below(_TRANSFORMERS_MIN_PEFT):
            return False
        if not getattr(self, "_hf_peft_config_loaded", False):
            raise ValueError("No adapter loaded. Please load an adapter first.")
        return True

    def _bitnet_tuner_modules(self, with_modules_to_save: bool = False):
        from peft.utils import ModulesToSaveWrapper

        kinds = (BaseTunerLayer, ModulesToSaveWrapper) if with_modules_to_save else (BaseTunerLayer,)
        return [m for m in self.modules() if isinstance(m, kinds)]

    def active_adapters(self) -> list[str]:
        """The names of the active adapters (Transformers' ``active_adapters``)."""
        if not self._bitnet_needs_peft_compat():
            return super().active_adapters()
        tuners = self._bitnet_tuner_modules()
        if not tuners:
            raise ValueError("the model has no adapter layers")
        active = tuners[0].active_adapter
        return [active] if isinstance(active, str) else list(active)

    def set_adapter(self, adapter_name: list[str] | str) -> None:
        """Activate ``adapter_name`` (one name or a list) and deactivate the others."""
        if not self._bitnet_needs_peft_compat():
            return super().set_adapter(adapter_name)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found; loaded adapters: {list(self.peft_config)}")
        modules = self._bitnet_tuner_modules(with_modules_to_save=True)
        if not modules:
            raise ValueError("the model has no adapter layers to set")
        for module in modules:
            module.set_adapter(adapter_name)

    def disable_adapters(self) -> None:
        """Run the base model only (the adapters stay loaded)."""
        if not self._bitnet_needs_peft_compat():
            return super().disable_adapters()
        for module in self._bitnet_tuner_modules(with_modules_to_save=True):
            module.enable_adapters(enabled=False)

    def enable_adapters(self) -> None:
        """Use the loaded adapters again after :meth:`disable_adapters`."""
        if not self._bitnet_needs_peft_compat():
            return super().enable_adapters()
        for module in self._bitnet_tuner_modules():
            module.enable_adapters(enabled=True)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The weights of one adapter (default: the first active one), keyed as peft saves them."""
        if not self._bitnet_needs_peft_compat():
            return super().get_adapter_state_dict(adapter_name, state_dict)
        from peft import get_peft_model_state_dict

        adapter_name = adapter_name or self.active_adapters()[0]
        return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=adapter_name)

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Add a fresh (trainable) adapter from a ``PeftConfig`` and activate it."""
        if not _peft_version_below(_TRANSFORMERS_MIN_PEFT):
            return super().add_adapter(adapter_config, adapter_name)
        from peft import PeftConfig, inject_adapter_in_model

        adapter_name = adapter_name or "default"
        if not isinstance(adapter_config, PeftConfig):
            raise TypeError(f"adapter_config should be a PeftConfig, got {type(adapter_config).__name__}")
        if getattr(self, "_hf_peft_config_loaded", False) and adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        self._hf_peft_config_loaded = True
        adapter_config.base_model_name_or_path = self.__dict__.get("name_or_path", None)
        inject_adapter_in_model(adapter_config, self, adapter_name)
        self.set_adapter(adapter_name)

    def delete_adapter(self, adapter_names: list[str] | str) -> None:
        """Remove one or more adapters (their layers and config)."""
        if not self._bitnet_needs_peft_compat():
            return super().delete_adapter(adapter_names)
        from peft.functional import delete_adapter

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"adapter(s) {missing} are not loaded and cannot be deleted")
        for name in names:
            delete_adapter(self, adapter_name=name, prefix=f"{self.peft_config[name].peft_type.value.lower()}_")
            self.peft_config.pop(name, None)
        if not self.peft_config:
            del self.peft_config
            self._hf_peft_config_loaded = False
