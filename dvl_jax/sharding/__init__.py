"""Sharding over a named device mesh: the mesh, the logical-axis rules of each strategy, and data placement.

Model code names only logical axes: params through `nn.with_logical_partitioning` (nn/layers.py) and
activations through `constrain` (activations.py). This package maps them onto the three mesh axes and is the only
code that talks to mesh APIs:

  mesh.py         the mesh: MeshSpec, make_mesh
  rules.py        the logical axis names, the strategies' rule tables
  plan.py         ShardingPlan: logical axes -> shardings of params, optimizer states and activations
  placement.py    host rows -> global batch arrays and back, across processes (ShardingPlan's methods)
  activations.py  constrain, tower, per_shard: what model code calls while a plan is active

  mesh axes   data (replicas), fsdp (params sharded, batch split), tensor (heads, mlp and vocab split)
  strategies  "data"         batch over data x fsdp; params replicated
              "fsdp"         + every param's `embed` axis over fsdp (ZeRO-3: XLA gathers a layer's weights
                             just before they are used)
              "tensor"       + heads, kv heads, mlp and vocab over tensor (Megatron: one all-reduce after the
                             attention output and after the MLP down projection)
              "fsdp_tensor"  both
The image towers (SigLIP, SAM and the aligner) can use another strategy than the decoder (`vision_strategy`):
SAM-B's 12 heads, for one, do not split 8 ways.

Dimensions that do not divide over their mesh axes: the vocabulary is padded (`ShardingPlan.padded_vocab_size`,
as vLLM and MaxText pad it to a multiple of the tensor size); any other such dimension is replicated, with an
`UnevenShardingWarning` that names it; a batch that does not divide is refused (the model pads its batches).

  plan = ShardingPlan(MeshSpec(data=2, fsdp=2, tensor=2))  # or "data=2,fsdp=2,tensor=2", or a jax Mesh
  model = dvl_jax.load(path, mesh=plan)                    # params restored straight into their shards
"""

from dvl_jax.sharding.activations import active_plan, constrain, per_shard, tower
from dvl_jax.sharding.mesh import MESH_AXES, MeshSpec, default_strategy, make_mesh
from dvl_jax.sharding.plan import ShardingPlan
from dvl_jax.sharding.rules import (ACTIVATION_AXES, BATCH_AXES, LOGICAL_AXES, PADDED_BY_CALLER, PARAM_AXES, STRATEGIES,
                                    TOWERS, VOCAB_AXES, Rules, UnevenShardingWarning)

__all__ = ["ACTIVATION_AXES", "BATCH_AXES", "LOGICAL_AXES", "MESH_AXES", "PADDED_BY_CALLER", "PARAM_AXES", "STRATEGIES",
           "TOWERS", "VOCAB_AXES", "MeshSpec", "Rules", "ShardingPlan", "UnevenShardingWarning", "active_plan",
           "constrain", "default_strategy", "make_mesh", "per_shard", "tower"]
