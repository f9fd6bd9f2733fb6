"""Single-process checks of the parallel package: mesh shapes from Megatron's flags, the
recompute switches (they recompute what they claim and change no numbers), and inductor compile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import parallel_worker
from megatron.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron.parallel.config import ParallelConfig
from megatron.parallel.mesh import MeshShape, mesh_shape
from megatron.parallel.parallelize import parallelize_model

aten = torch.ops.aten


@pytest.mark.parametrize("kwargs,world,expected", [
    (dict(), 1, MeshShape(1, 1, 1, 1)),
    (dict(tensor_model_parallel_size=2), 8, MeshShape(1, 4, 1, 2)),
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_type="fsdp"), 16,
     MeshShape(2, 1, 4, 2)),
    (dict(tensor_model_parallel_size=8, data_parallel_type="fsdp", data_parallel_sharding_degree=1), 16,
     MeshShape(1, 2, 1, 8)),
    (dict(data_parallel_type="fsdp", data_parallel_sharding_degree=8), 32, MeshShape(1, 4, 8, 1)),
])
def test_mesh_shape_from_flags(kwargs, world, expected):
    shape = mesh_shape(ParallelConfig(**kwargs), world)
    assert shape == expected
    assert shape.world_size == world


@pytest.mark.parametrize("kwargs,world,message", [
    (dict(tensor_model_parallel_size=3), 8, "not divisible by --tensor-model-parallel-size 3"),
    (dict(data_parallel_type="fsdp", data_parallel_sharding_degree=3), 8, "must divide the data-parallel size 8"),
    (dict(data_parallel_sharding_degree=2), 8, "needs --data-parallel-type fsdp"),
    (dict(data_parallel_type="zero"), 8, "unknown --data-parallel-type"),
])
def test_mesh_shape_rejects_bad_flags(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(ParallelConfig(**kwargs), world)


def test_sequence_parallel_without_tensor_parallel_is_refused():
    with pytest.raises(ValueError, match="--sequence-parallel needs"):
        parallelize_model(parallel_worker.build_model("gpt"), ParallelConfig(sequence_parallel=True), None)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] = self.counts.get(func.overloadpacket, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(granularity):
    model = parallel_worker.build_model("gpt")
    if granularity is not None:
        apply_activation_checkpointing(model, granularity)
    tokens = parallel_worker.make_batch("gpt", 0)["tokens"]
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    with OpCounter() as counter:
        loss.backward()
    return counter.counts, loss.item(), model.layers["0"].attention.wq.weight.grad.clone()


def test_recompute_granularities_recompute_what_they_claim_and_change_no_numbers():
    none_counts, none_loss, none_grad = backward_op_counts(None)
    full_counts, full_loss, full_grad = backward_op_counts("full")
    sel_counts, sel_loss, sel_grad = backward_op_counts("selective")
    matmuls = lambda c: c.get(aten.mm, 0) + c.get(aten.addmm, 0) + c.get(aten.bmm, 0)
    # full: the blocks' forward matmuls run again in backward: 7 linears per block, less the last
    # one (w2), whose output no backward needs, so recomputation stops before it.
    assert matmuls(full_counts) == matmuls(none_counts) + 6 * 2
    # selective: no matmul is recomputed, but the elementwise ops (RMSNorm's rsqrt, SwiGLU's silu) are.
    assert matmuls(sel_counts) == matmuls(none_counts)
    assert sel_counts.get(aten.rsqrt, 0) > none_counts.get(aten.rsqrt, 0)
    assert sel_counts.get(aten.silu, 0) > none_counts.get(aten.silu, 0)
    assert full_loss == none_loss == sel_loss
    torch.testing.assert_close(full_grad, none_grad, rtol=0, atol=0)
    torch.testing.assert_close(sel_grad, none_grad, rtol=0, atol=0)


def test_unknown_recompute_granularity_is_refused():
    with pytest.raises(ValueError, match="unknown --recompute-granularity 'some'"):
        apply_activation_checkpointing(parallel_worker.build_model("gpt"), "some")


@pytest.mark.slow
def test_inductor_compiled_blocks_train_like_eager():
    eager = parallel_worker.run({"kind": "gpt", "steps": 3})
    compiled = parallel_worker.run({"kind": "gpt", "steps": 3, "compile": True, "compile_backend": "inductor",
                                    "recompute": "selective"})
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=1e-6)
    for name, values in eager["params"].items():
        torch.testing.assert_close(torch.tensor(compiled["params"][name]), torch.tensor(values), rtol=1e-4, atol=1e-6)
