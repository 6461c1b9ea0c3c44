"""ParallelConfig: the shape of a parallel run, validated on construction.

The world is laid out as ``ExternalDP x DP x PP x PCP x TP`` (TP fastest):

    rank = (((e * dp + d) * pp + p) * pcp + c) * tp + t

``ExternalDP`` (``external_data_parallel_size``) is whatever is left of the
world once DP, PP, PCP and TP are accounted for: replicas that generate
independently (e.g. several engine instances inside one training job).

Every combination that the reference engine would reject with an assert or a
reshape error, or would accept while building a silently wrong group, is
refused here with a ``ValueError`` that names the fields and their values.
This module needs neither torch nor ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["ParallelConfig"]


def _fields_text(config: "ParallelConfig", *names: str) -> str:
    return ", ".join(f"{name}={getattr(config, name)!r}" for name in names)


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes and switches that decide which process groups exist and their ranks.

    Args:
        world_size: number of ranks in the default process group.
        tensor_parallel_size: ranks of one tensor-parallel group (consecutive ranks).
        data_parallel_size: data-parallel replicas inside one model instance.
        pipeline_parallel_size: pipeline stages.
        prefill_context_parallel_size: prefill context-parallel size (between PP and TP).
        oproj_tensor_parallel_size: fine-grained TP size of the attention output
            projection, built across the DP dimension; 0 = off.
        lmhead_tensor_parallel_size: same for the LM head; 0 = off.
        embedding_tensor_parallel_size: same for the input embedding; 0 = off.
        mlp_tensor_parallel_size: same for dense MLP blocks; 0 = off.
        flashcomm2_oproj_tensor_parallel_size: flashcomm2 O-proj TP size inside
            each TP group; ``None`` = flashcomm2 off, 1 = on without an O-TP group
            (the O-DP group is then the TP group).
        layer_sharding: build the shard-weight group (layer weights sharded
            across the ranks that hold the same TP shard in one stage).
        dsa_cp_layer_shard: with ``layer_sharding``, the sharded layers are
            replicated (DSA context parallel): one shard-weight group per stage.
        dynamic_eplb: build the dynamic-EPLB group (same ranks as MC2, its own
            communicator).
        multistream_overlap_gate: build the fc3 quant group (same ranks as MC2,
            its own communicator).
        pd_tp_ratio: prefill TP / decode TP in disaggregated prefill.
        pd_head_ratio: prefill heads per rank ratio; > 1 on a KV producer builds
            the prefill-TP (all-to-all) group ``p_tp``.
        num_head_replica: replicas of each KV head on the prefill side.
        kv_producer: this instance is the prefill (KV-producing) side.
    """

    world_size: int
    tensor_parallel_size: int
    data_parallel_size: int
    pipeline_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    oproj_tensor_parallel_size: int = 0
    lmhead_tensor_parallel_size: int = 0
    embedding_tensor_parallel_size: int = 0
    mlp_tensor_parallel_size: int = 0
    flashcomm2_oproj_tensor_parallel_size: Optional[int] = None
    layer_sharding: bool = False
    dsa_cp_layer_shard: bool = False
    dynamic_eplb: bool = False
    multistream_overlap_gate: bool = False
    pd_tp_ratio: int = 1
    pd_head_ratio: int = 1
    num_head_replica: int = 1
    kv_producer: bool = False

    # ------------------------------------------------------------------ derived

    @property
    def model_size(self) -> int:
        """Ranks of one model instance: DP * PP * PCP * TP."""
        return (self.data_parallel_size * self.pipeline_parallel_size
                * self.prefill_context_parallel_size * self.tensor_parallel_size)

    @property
    def external_data_parallel_size(self) -> int:
        """Independent model instances in the world: world_size / (DP * PP * PCP * TP)."""
        return self.world_size // self.model_size

    @property
    def finegrained_tp_sizes(self) -> dict[str, int]:
        """Family name -> fine-grained TP size, for the families that are on."""
        sizes = {
            "otp": self.oproj_tensor_parallel_size,
            "lmhead_tp": self.lmhead_tensor_parallel_size,
            "embed_tp": self.embedding_tensor_parallel_size,
            "mlp_tp": self.mlp_tensor_parallel_size,
        }
        return {name: size for name, size in sizes.items() if size > 0}

    @property
    def flashcomm2_enabled(self) -> bool:
        return self.flashcomm2_oproj_tensor_parallel_size is not None

    @property
    def prefill_tp_enabled(self) -> bool:
        """Whether the prefill-TP (all-to-all) group ``p_tp`` is built."""
        return self.pd_head_ratio > 1 and self.kv_producer

    @property
    def shard_weight_mode(self) -> Optional[str]:
        """How the shard-weight group is built: None (off), 'flashcomm2',
        'replicated' (flashcomm2 with O-TP 1, or DSA-CP) or 'tp'."""
        if not self.layer_sharding:
            return None
        if self.flashcomm2_enabled:
            return "flashcomm2" if self.flashcomm2_oproj_tensor_parallel_size > 1 else "replicated"
        if self.dsa_cp_layer_shard:
            return "replicated"
        return "tp"

    # --------------------------------------------------------------- validation

    def __post_init__(self) -> None:
        self._check_types()
        self._check_world()
        self._check_finegrained()
        self._check_flashcomm2()
        self._check_shard_weight()
        self._check_prefill_tp()

    def _fail(self, message: str, *names: str) -> None:
        raise ValueError(f"ParallelConfig: {message} (got {_fields_text(self, *names)})")

    def _check_types(self) -> None:
        bool_fields = {"layer_sharding", "dsa_cp_layer_shard", "dynamic_eplb",
                       "multistream_overlap_gate", "kv_producer"}
        at_least_one = {"world_size", "tensor_parallel_size", "data_parallel_size",
                        "pipeline_parallel_size", "prefill_context_parallel_size",
                        "pd_tp_ratio", "pd_head_ratio", "num_head_replica"}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in bool_fields:
                if not isinstance(value, bool):
                    self._fail(f"{field.name} must be a bool", field.name)
                continue
            if field.name == "flashcomm2_oproj_tensor_parallel_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(f"{field.name} must be an int", field.name)
            minimum = 1 if (field.name in at_least_one
                            or field.name == "flashcomm2_oproj_tensor_parallel_size") else 0
            if value < minimum:
                what = ">= 1" if minimum == 1 else ">= 0 (0 = off)"
                if field.name == "flashcomm2_oproj_tensor_parallel_size":
                    what = ">= 1, or None for flashcomm2 off"
                self._fail(f"{field.name} must be {what}", field.name)

    def _check_world(self) -> None:
        if self.world_size % self.model_size != 0:
            self._fail("world_size must be a multiple of data_parallel_size * pipeline_parallel_size"
                       f" * prefill_context_parallel_size * tensor_parallel_size = {self.model_size}",
                       "world_size", "data_parallel_size", "pipeline_parallel_size",
                       "prefill_context_parallel_size", "tensor_parallel_size")
        if self.pipeline_parallel_size > 1 and self.data_parallel_size > 1:
            # The reference reads the rank grid pipeline-major for MC2 and the
            # fine-grained TP groups but DP-major for flashcomm2 and shard-weight:
            # with both > 1 one of the two sets of groups mixes pipeline stages.
            self._fail("pipeline_parallel_size > 1 together with data_parallel_size > 1 is not"
                       " supported: the MC2 and fine-grained TP layouts would mix pipeline stages",
                       "pipeline_parallel_size", "data_parallel_size")

    def _check_finegrained(self) -> None:
        dp = self.data_parallel_size
        for name, size in self.finegrained_tp_sizes.items():
            field = {"otp": "oproj_tensor_parallel_size", "lmhead_tp": "lmhead_tensor_parallel_size",
                     "embed_tp": "embedding_tensor_parallel_size",
                     "mlp_tp": "mlp_tensor_parallel_size"}[name]
            if self.world_size != self.pipeline_parallel_size * dp * self.tensor_parallel_size:
                # Fine-grained groups index the world as (PP, DP, TP): PCP or an
                # external DP leaves ranks the grid cannot hold.
                self._fail(f"{field} > 0 needs world_size == pipeline_parallel_size *"
                           " data_parallel_size * tensor_parallel_size (no prefill context"
                           " parallelism, no external data parallelism)",
                           field, "world_size", "pipeline_parallel_size", "data_parallel_size",
                           "prefill_context_parallel_size", "tensor_parallel_size")
            if dp % size != 0:
                # Groups are built across DP replicas: leftovers would sit in no group.
                self._fail(f"{field} must divide data_parallel_size (fine-grained TP groups are"
                           " built across the data-parallel replicas)", field, "data_parallel_size")

    def _check_flashcomm2(self) -> None:
        otp = self.flashcomm2_oproj_tensor_parallel_size
        if otp is None or otp == 1:
            return  # O-TP 1 uses the TP group as O-DP: valid for every layout
        names = ("flashcomm2_oproj_tensor_parallel_size", "tensor_parallel_size")
        if self.tensor_parallel_size % otp != 0:
            self._fail("flashcomm2_oproj_tensor_parallel_size must divide tensor_parallel_size",
                       *names)
        if self.world_size != (self.data_parallel_size * self.pipeline_parallel_size
                               * self.tensor_parallel_size):
            self._fail("flashcomm2_oproj_tensor_parallel_size > 1 needs world_size =="
                       " data_parallel_size * pipeline_parallel_size * tensor_parallel_size (the"
                       " flashcomm2 groups know no prefill context or external data parallelism)",
                       "flashcomm2_oproj_tensor_parallel_size", "world_size", "data_parallel_size",
                       "pipeline_parallel_size", "prefill_context_parallel_size",
                       "tensor_parallel_size")

    def _check_shard_weight(self) -> None:
        if self.dsa_cp_layer_shard and not self.layer_sharding:
            self._fail("dsa_cp_layer_shard only applies with layer_sharding",
                       "dsa_cp_layer_shard", "layer_sharding")
        mode = self.shard_weight_mode
        # Layer sharding over a single flashcomm2 O-proj TP group is accepted: the reference
        # squeezes the one group's rank array to 1-D and fails, but the layout here builds one
        # shard-weight group per O-TP shard (each held by one rank), and moe_ext.parallel's
        # flashcomm2 op runs on it (tests/test_parallel_linear.py).
        if (mode == "tp" and self.pipeline_parallel_size > 1
                and self.external_data_parallel_size > 1):
            # TP groups are cut into PP consecutive chunks; with external DP a
            # chunk is not a pipeline stage.
            self._fail("layer_sharding over TP groups with pipeline_parallel_size > 1 needs"
                       " world_size == data_parallel_size * pipeline_parallel_size *"
                       " prefill_context_parallel_size * tensor_parallel_size (no external data"
                       " parallelism)", "layer_sharding", "pipeline_parallel_size", "world_size",
                       "data_parallel_size", "prefill_context_parallel_size", "tensor_parallel_size")

    def _check_prefill_tp(self) -> None:
        if not self.prefill_tp_enabled:
            return
        tp, ratio, replicas = self.tensor_parallel_size, self.pd_tp_ratio, self.num_head_replica
        if tp % ratio != 0:
            # Otherwise the groups of pd_tp_ratio consecutive ranks straddle TP
            # groups, and the decode TP size tp / pd_tp_ratio is not whole.
            self._fail("pd_tp_ratio must divide tensor_parallel_size when the prefill TP group is"
                       " built (pd_head_ratio > 1 and kv_producer)",
                       "pd_tp_ratio", "tensor_parallel_size", "pd_head_ratio", "kv_producer")
        if replicas == 1:
            return
        if self.world_size != (self.data_parallel_size * self.prefill_context_parallel_size * tp):
            self._fail("num_head_replica > 1 needs world_size == data_parallel_size *"
                       " prefill_context_parallel_size * tensor_parallel_size (head replicas are"
                       " laid out inside each TP group)", "num_head_replica", "world_size",
                       "data_parallel_size", "pipeline_parallel_size",
                       "prefill_context_parallel_size", "tensor_parallel_size")
        if tp % replicas != 0:
            self._fail("num_head_replica must divide tensor_parallel_size",
                       "num_head_replica", "tensor_parallel_size")
        heads_per_replica = tp // replicas
        decode_tp = tp // ratio
        group_size = heads_per_replica // decode_tp
        if group_size < 1 or heads_per_replica % group_size != 0:
            self._fail("the prefill all-to-all group size (tensor_parallel_size / num_head_replica)"
                       " // (tensor_parallel_size / pd_tp_ratio) must be >= 1 and divide"
                       " tensor_parallel_size / num_head_replica",
                       "tensor_parallel_size", "num_head_replica", "pd_tp_ratio")
