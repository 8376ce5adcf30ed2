import math

from quikft.config import QuantConfig, QuantizeJob
from quikft.quantize import quantize


def test_quick_eval_reports_fp_and_quantized_ppl_and_caches_fp(tiny_dir, text_file, tmp_path, monkeypatch,
                                                                shared_data):
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    scheme = QuantConfig(bits=2, salient=4, group_size=32, calib=str(text_file), nsamples=4, seqlen=32)
    job = QuantizeJob(scheme, model=str(tiny_dir), eval_windows=2, eval_seqlen=64, eval_stride=8,
                      out=str(tmp_path / "run"))
    report = quantize(job, progress=False)
    assert report["fp_ppl"]["windows"] == report["ppl"]["windows"] == 2
    assert report["ppl"]["seqlen"] == 64 and math.isfinite(report["ppl"]["ppl"])
    assert report["ppl"]["ppl"] != report["fp_ppl"]["ppl"]  # 2-bit weights change the model
    cached = list((tmp_path / "cache" / "ppl").glob("*.json"))
    assert len(cached) == 1
    job.overwrite = True  # replace the previous output
    again = quantize(job, progress=False)
    assert again["fp_ppl"] == report["fp_ppl"] and again["ppl"]["ppl"] == report["ppl"]["ppl"]


def test_a_cache_that_is_a_file_is_refused_before_the_model_loads(tiny_dir, text_file, tmp_path, monkeypatch):
    import pytest

    import quikft.jobs.quantize.job
    from quikft.config import QuantizeJob, from_settings

    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    monkeypatch.setenv("QUIKFT_CACHE", str(blocker / "quikft"))
    monkeypatch.setattr(quikft.jobs.quantize.job, "open_model", lambda job: pytest.fail("the model was loaded"))
    job = from_settings(QuantizeJob, {"model": str(tiny_dir), "calib": str(text_file), "out": str(tmp_path / "o")})
    with pytest.raises(ValueError, match="is not a directory; point QUIKFT_CACHE at a directory"):
        quikft.jobs.quantize.job.quantize(job, progress=False)


def test_a_fraction_of_salient_columns_resolves_per_layer_and_the_report_counts_bits(tiny_dir, text_file, tmp_path,
                                                                                     monkeypatch):
    import json

    from quikft.bits import predict_bits
    from quikft.checkpoint import load, stored_bits
    from quikft.config import build_config

    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    job = build_config(QuantizeJob, model=str(tiny_dir), salient="5%", bits=3, group_size=32, calib=str(text_file),
                       nsamples=2, seqlen=16, eval_windows=0, out=str(tmp_path / "run"))
    report = quantize(job, progress=False)
    ks = {layer["in_features"]: layer["salient"] for layer in report["layers"]}
    assert ks == {64: 3, 160: 8}  # round(0.05 * 64) = round(3.2), round(0.05 * 160)
    qconfig = json.loads((tmp_path / "run" / "config.json").read_text())["quantization_config"]
    assert qconfig["salient"] == 0.05 and qconfig["settings"]["salient"] == 0.05  # the scheme as given
    model = load(tmp_path / "run")  # per-layer k comes from the stored salient_idx shapes
    assert model.get_submodule("model.layers.0.mlp.down_proj").k == 8
    counted = stored_bits(tmp_path / "run")
    assert report["bits_per_weight"] == counted.to_dict()
    shapes = [(layer["in_features"], layer["out_features"]) for layer in report["layers"]]
    assert report["bits_per_weight"]["linear"] == predict_bits(shapes, 3, 0.05, 32).linear_bpw

    job.fake_quant, job.out = True, str(tmp_path / "fake")
    fake = quantize(job, progress=False)
    assert fake["bits_per_weight"] == {"linear": counted.linear_bpw, "model": None}
