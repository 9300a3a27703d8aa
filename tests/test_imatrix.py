"""Importance matrices: collected statistics against a hand computation, llama.cpp's two file
layouts read back by gguf-py and by a parser written here from llama.cpp's loader, and RTN
weighted by a file exactly as by the same importance passed directly."""

import json
import math
import struct

import pytest
import torch

from lowbit.calib import imatrix


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from lowbit.model.load import load_source

    return load_source(str(tiny_llama))


@pytest.fixture(scope="module")
def stats(tiny):
    from lowbit.model.targets import select_targets

    windows = torch.randint(0, 90, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = select_targets(tiny.model)
    return windows, targets, imatrix.collect(tiny.model, targets, windows, batch_size=2, progress=False)


def test_collected_sums_are_the_squared_inputs(tiny, stats):
    windows, targets, st = stats
    model = tiny.model
    assert set(st) == {t.name for t in targets} and len(st) == 2 * 7
    with torch.no_grad():   # layer 0's attention input, computed by hand: RMSNorm of the embeddings
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows)).double()
    sums, count = st["model.layers.0.self_attn.q_proj.weight"]
    assert count == windows.numel()
    torch.testing.assert_close(sums, x.square().sum((0, 1)), rtol=1e-6, atol=1e-9)
    assert torch.equal(st["model.layers.0.self_attn.k_proj.weight"][0], sums)   # q, k, v read the same input
    assert st["model.layers.1.mlp.down_proj.weight"][0].shape == (160,)


def test_gguf_file_read_by_gguf_py(tiny, stats, tmp_path):
    from gguf import GGUFReader

    windows, _, st = stats
    names = imatrix.gguf_names(tiny.model)
    path = imatrix.write(tmp_path / "im.gguf", st, names, 3, 20, "text.txt")
    r = GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["text.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 3 and r.fields["imatrix.chunk_size"].contents() == 20
    tensors = {t.name: t for t in r.tensors}
    order = [t.name for t in r.tensors]   # llama.cpp's order: names sorted, each entry's sums then counts
    bases = sorted({n.rsplit(".", 1)[0] for n in order})
    assert order == [b + s for b in bases for s in (".in_sum2", ".counts")]
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type.name == "F32" and list(q.shape) == [96, 1]
    assert torch.equal(torch.from_numpy(q.data.copy()).reshape(-1), st["model.layers.0.self_attn.q_proj.weight"][0].float())
    assert float(tensors["blk.1.ffn_down.weight.counts"].data[0, 0]) == windows.numel()
    again = imatrix.write(tmp_path / "again.gguf", st, names, 3, 20, "text.txt")
    assert again.read_bytes() == path.read_bytes()


def _parse_legacy(data: bytes) -> tuple[dict, int, str]:
    """llama.cpp's common_imatrix_load_legacy, written out: entries, chunk count, dataset."""
    pos = 4
    (n,) = struct.unpack_from("<i", data, 0)
    out = {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + ln].decode()
        pos += 4 + ln
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        out[name] = (ncall, struct.unpack_from(f"<{nval}f", data, pos))
        pos += 4 * nval
    chunks, ln = struct.unpack_from("<ii", data, pos)
    return out, chunks, data[pos + 8:pos + 8 + ln].decode()


def test_legacy_dat_layout(tiny, stats, tmp_path):
    windows, _, st = stats
    names = imatrix.gguf_names(tiny.model)
    path = imatrix.write(tmp_path / "im.dat", st, names, 3, 8, "text.txt")
    entries, chunks, dataset = _parse_legacy(path.read_bytes())
    assert chunks == 3 and dataset == "text.txt" and list(entries) == sorted(entries) and len(entries) == 14
    ncall, values = entries["blk.0.attn_q.weight"]
    tokens = windows.numel()
    assert ncall == math.ceil(tokens / 8)   # llama.cpp: ceil(tokens / chunk size)
    sums = st["model.layers.0.self_attn.q_proj.weight"][0]
    # llama-quantize divides the values by ncall: the mean square per column
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64) / ncall, sums / tokens, rtol=1e-6, atol=1e-12)
    back = imatrix.read(path).mean_squares()["blk.0.attn_q.weight"]
    torch.testing.assert_close(back.double(), sums / tokens, rtol=1e-6, atol=1e-12)
    gg = imatrix.read(imatrix.write(tmp_path / "im.gguf", st, names, 3, 8, "text.txt")).mean_squares()
    torch.testing.assert_close(gg["blk.0.attn_q.weight"], back, rtol=1e-6, atol=1e-12)


def test_rtn_weighted_by_the_file_equals_rtn_with_the_importance(tiny_llama, stats, tiny, tmp_path):
    from lowbit.api import quantize
    from lowbit.errors import SchemeError
    from lowbit.scheme import WeightScheme
    from lowbit.tensor import quantize_tensor

    _, _, st = stats
    path = imatrix.write(tmp_path / "im.gguf", st, imatrix.gguf_names(tiny.model), 3, 20, "text.txt")
    scheme = WeightScheme(format="gguf_iq4_nl", bits=None, group_size=32)
    with_im = quantize(str(tiny_llama), scheme, imatrix=str(path), progress=False)
    plain = quantize(str(tiny_llama), scheme, progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    w = tiny.model.get_parameter(name).data
    # the file's mean squares (float32 sums / tokens; checked against the collected sums above)
    direct = quantize_tensor(w, scheme, importance=imatrix.read(path).mean_squares()["blk.1.ffn_down.weight"])
    assert torch.equal(with_im.tensors[name].codes, direct.codes)
    assert any(not torch.equal(with_im.tensors[n].codes, plain.tensors[n].codes) for n in plain.tensors)
    rec = with_im.recipe["imatrix"]
    assert rec["weighted"] == 14 and rec["no_entry"] == [] and len(rec["sha256"]) == 64
    assert with_im.recipe["recipe"]["imatrix"] == str(path)
    with pytest.raises(SchemeError, match="--imatrix weights round-to-nearest"):
        quantize(str(tiny_llama), scheme, method="gptq", imatrix=str(path), progress=False)


def test_cli_and_bad_files(tiny_llama, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(tiny_llama), "--samples", "2", "--seqlen", "16", "--calib", str(tiny_llama / "config.json"),
                 "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == 14 and summary["tokens"] == 32 and out.is_file()
    assert main(["imatrix", str(tiny_llama), "-o", str(tmp_path / "im.txt")]) == 2
    assert ".gguf" in capsys.readouterr().err
    bad = tmp_path / "bad.dat"
    bad.write_bytes(out.read_bytes()[4:40])
    q = ["quantize", str(tiny_llama), "--format", "gguf_iq4_nl", "--imatrix"]
    for path, msg in ((bad, "truncated or not an importance matrix"), (tmp_path / "none.dat", "does not exist")):
        assert main(q + [str(path), "-o", str(tmp_path / "q")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("lowbit: error:") and msg in err
    import gguf
    import numpy as np

    model_gguf = tmp_path / "model.gguf"   # a GGUF that is a model, not an importance matrix
    w = gguf.GGUFWriter(str(model_gguf), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(q + [str(model_gguf), "-o", str(tmp_path / "q")]) == 2
    assert "not an importance matrix" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
