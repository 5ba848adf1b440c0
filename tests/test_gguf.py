"""The GGUF reader and the weight types, checked against the `gguf` package (the format's reference
implementation) and against transformers running the very weights a GGUF file holds."""

import gguf
import numpy as np
import pytest
import torch

import tokenmill
from tokenmill import _core
from conftest import rel_err
from gguf_util import QTYPES, write_tiny_gguf

RNG = np.random.default_rng(0)


def test_metadata_value_types_roundtrip(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_array("t.floats", [0.25, -1.0])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = _core.GGUFFile(str(path))
    m = f.metadata()
    assert f.version == 3 and f.alignment == 32
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"], m["t.u32"], m["t.i32"]) == (
        200, -100, 60000, -30000, 4_000_000_000, -2_000_000_000)
    assert m["t.f32"] == 1.5 and m["t.bool"] is True and m["t.str"].decode() == "héllo ✓"
    assert m["t.u64"] == 2**63 + 5 and m["t.i64"] == -(2**62) and m["t.f64"] == 1e-300
    assert m["t.ints"] == [1, -2, 3] and m["t.strs"] == [b"a", b"bc", b""] and m["t.floats"] == [0.25, -1.0]
    assert m["t.nested"] == [[1, 2], [3]]
    assert f.tensors() == [("x", "f32", [3, 2], 0, 24)]
    np.testing.assert_array_equal(f.dequantize("x"), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("wtype", list(QTYPES))
def test_dequantize_matches_gguf_reference(tmp_path, wtype):
    qtype = QTYPES[wtype]
    data = (RNG.standard_normal((8, 96)) * 3).astype(np.float32)
    data[0, :32] = 0.0   # an all-zero block
    path = tmp_path / f"{wtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if wtype == "f32":
        w.add_tensor("t", data)
        expected = data
    elif wtype == "f16":
        w.add_tensor("t", data.astype(np.float16))
        expected = data.astype(np.float16).astype(np.float32)
    else:
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor("t", q, raw_dtype=qtype)
        expected = gguf.quants.dequantize(q, qtype).reshape(data.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.testing.assert_array_equal(_core.GGUFFile(str(path)).dequantize("t"), expected)


@pytest.mark.parametrize("wtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantize_matches_gguf_reference(wtype):
    data = (RNG.standard_normal(32 * 64) * 2).astype(np.float32)
    data[:32] = 0.0
    data[32:64] = 7.0   # a constant block
    if wtype == "f16":
        expected = data.astype(np.float16).tobytes()
    else:
        expected = gguf.quants.quantize(data, QTYPES[wtype]).tobytes()
    ours = _core.quantize(wtype, data)
    assert ours == expected
    np.testing.assert_array_equal(_core.dequantize(wtype, ours, data.size),
                                  gguf.quants.dequantize(np.frombuffer(expected, np.uint8), QTYPES[wtype]).ravel()
                                  if wtype != "f16" else data.astype(np.float16).astype(np.float32))


def test_fp16_conversion_is_exact_for_every_half():
    halves = np.arange(2**16, dtype=np.uint16)
    ours = _core.dequantize("f16", halves.tobytes(), halves.size)
    ref = halves.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.array_equal(np.isnan(ours), np.isnan(ref)) and np.array_equal(np.isinf(ours), np.isinf(ref))


@pytest.mark.parametrize("arch,wtype", [("llama", t) for t in QTYPES] + [("qwen2", "f32"), ("qwen2", "q8_0"),
                                                                        ("gpt2", "f32"), ("gpt2", "q4_1")])
def test_gguf_model_matches_transformers_on_the_same_weights(tiny_models, tmp_path, arch, wtype):
    """The GGUF path (names, llama's permuted Q/K rows, every weight type) against transformers
    running the dequantized weights of the same file."""
    _, hf_model = tiny_models[arch]
    path = tmp_path / f"{arch}-{wtype}.gguf"
    reference = write_tiny_gguf(hf_model, arch, path, wtype)
    ids = np.random.default_rng(7).integers(0, 320, size=48).tolist()
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    model = tokenmill.load(path)
    assert model.tokenizer is None   # these files carry no vocabulary
    assert rel_err(model.logits(ids), ref) < 1e-4                # prefill kernels
    assert rel_err(model.logits(ids, chunk=1), ref) < 1e-4       # decode kernels, one token at a time


def test_model_without_tokenizer_says_so(tiny_models, tmp_path):
    _, hf_model = tiny_models["llama"]
    write_tiny_gguf(hf_model, "llama", tmp_path / "m.gguf")
    model = tokenmill.load(tmp_path / "m.gguf")
    with pytest.raises(tokenmill.TokenmillError, match="no tokenizer"):
        model.generate("hello")


@pytest.mark.parametrize("wtype", ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_convert_requantizes_like_the_reference(tiny_models, tmp_path, wtype):
    """`tokenmill convert` of an f32 GGUF equals the file the reference writer makes in that type."""
    from tokenmill.tools.convert import convert_gguf

    _, hf_model = tiny_models["llama"]
    write_tiny_gguf(hf_model, "llama", tmp_path / "f32.gguf", "f32")
    write_tiny_gguf(hf_model, "llama", tmp_path / "ref.gguf", wtype)
    convert_gguf(tmp_path / "f32.gguf", tmp_path / "out.gguf", wtype)
    ours, ref = _core.GGUFFile(str(tmp_path / "out.gguf")), _core.GGUFFile(str(tmp_path / "ref.gguf"))
    assert [(n, t, s) for n, t, s, _, _ in ours.tensors()] == [(n, t, s) for n, t, s, _, _ in ref.tensors()]
    for name, *_ in ref.tensors():
        np.testing.assert_array_equal(ours.dequantize(name), ref.dequantize(name))
    assert ours.metadata() == ref.metadata()
    ids = list(range(3, 40))
    np.testing.assert_array_equal(tokenmill.load(tmp_path / "out.gguf").logits(ids),
                                  tokenmill.load(tmp_path / "ref.gguf").logits(ids))


def test_convert_keeps_the_default_model_working(default_gguf, tmp_path):
    from tokenmill.tools.convert import convert_gguf

    out = convert_gguf(default_gguf, tmp_path / "smol.q8_0.gguf", "q8_0")
    model = tokenmill.load(out)
    assert {t for _, t, s, _, _ in _core.GGUFFile(str(out)).tensors() if len(s) == 2} == {"q8_0"}
    assert model.tokenize("Hello world") == tokenmill.load(default_gguf).tokenize("Hello world")
    answer = model.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    assert "Paris" in answer


def test_weights_converted_on_load_equal_a_converted_file(default_gguf, tmp_path):
    """load(weights=...) computes with exactly the numbers `tokenmill convert` writes."""
    from tokenmill.tools.convert import convert_gguf

    ids = tokenmill.load(default_gguf).tokenize("Converted on load or on disk, the same model.")
    on_disk = tokenmill.load(convert_gguf(default_gguf, tmp_path / "smol.q8_0.gguf", "q8_0"))
    on_load = tokenmill.load(default_gguf, weights="q8_0")
    np.testing.assert_array_equal(on_load.logits(ids), on_disk.logits(ids))
    assert on_load.weight_bytes == on_disk.weight_bytes


@pytest.mark.parametrize("wtype", ["f16", "q8_0", "q4_0"])
def test_hf_model_converted_on_load_matches_the_reference_quantization(tiny_models, tmp_path, wtype):
    """An f32 safetensors model converted on load against the GGUF the reference writer quantizes."""
    d, hf_model = tiny_models["llama"]
    write_tiny_gguf(hf_model, "llama", tmp_path / "ref.gguf", wtype)
    ids = list(range(3, 40))
    ours = tokenmill.load(d, weights=wtype)
    ref = tokenmill.load(tmp_path / "ref.gguf")
    np.testing.assert_allclose(ours.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
    assert ours.weight_bytes < tokenmill.load(d).weight_bytes


def test_unknown_weight_type_on_load_is_an_error(default_gguf):
    with pytest.raises(tokenmill.InvalidArgumentError, match="weights must be one of"):
        tokenmill.load(default_gguf, weights="q2_k")
