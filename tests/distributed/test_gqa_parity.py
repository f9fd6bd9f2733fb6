"""Grouped-query attention (4 query heads sharing 2 key/value heads, q/k/v biases) under tp2 and
tp2 + sp trains like one process: each rank holds one key/value head and the two query heads
that share it. RETRO around a GQA decoder too (its CCA and encoder keep one key/value head per
query head)."""

import pytest

import parallel_worker
from test_parallel_parity import assert_same_training, run_launch

GQA = {"num_query_groups": 2, "add_qkv_bias": True}
LAYOUTS = {"tp2": dict(tensor_model_parallel_size=2),
           "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}
# RETRO in the layout whose plan does the most (sequence parallel gathers the CCA input): CPU is scarce.
KINDS = {"gpt": list(LAYOUTS), "retro": ["tp2_sp"]}

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    specs = [{"name": f"{kind}_{layout}", "kind": kind, "model": GQA, "steps": 5, "parallel": LAYOUTS[layout]}
             for kind, layouts in KINDS.items() for layout in layouts]
    return run_launch(tmp_path_factory.mktemp("gqa"), specs, 2, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_gqa_tensor_parallel_matches_single_process(kind, two_proc):
    reference = parallel_worker.run({"kind": kind, "model": GQA, "steps": 5})
    for layout in KINDS[kind]:
        assert_same_training(two_proc[f"{kind}_{layout}"], reference, f"{kind} {layout} with GQA")
