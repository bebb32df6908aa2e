"""A diffusers UNet2DModel + scheduler saved with ``save_pretrained`` as a teacher: loaded by path,
distilled from the command line by every method, its students saved, reloaded and resumed.
Tiny random UNets; nothing is downloaded."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.methods.base import get_method
from fewstep.methods.sid import sid_generator_loss
from fewstep.model import load_model, one_step_generate
from fewstep.teachers.diffusers_adapter import diffusers_model, from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

QUIET = ["--no-progress", "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, **kw).eval()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A pipeline folder (model_index.json, unet/, scheduler/) of a v-prediction UNet on a cosine table."""
    d = tmp_path_factory.mktemp("diffusers") / "pipe"
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(d)
    return d


def _probe(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([0.02, 0.5, 2.5, 30.0])[:n]


def test_pipeline_folder_loads_as_the_adapter_builds_it(pipe):
    model = load_model(pipe)
    unet = UNet2DModel.from_pretrained(pipe / "unet")
    ref = from_diffusers(unet.eval(), DDPMScheduler.from_pretrained(pipe / "scheduler"))
    x, s = _probe()
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, s), ref(x, s), rtol=0, atol=0)
    assert model.config["data"]["sample_shape"] == [1, 8, 8] and model.data_info.num_classes == 0
    assert model.config["precond"]["prediction"] == "v_prediction"
    rec = model.sampling  # Heun on the Karras grid spanning the table's own σ range
    assert rec["sampler"] == "heun" and rec["sigma_max"] == pytest.approx(ref.sigma_max)
    assert rec["sigma_min"] == pytest.approx(ref.sigma_min)
    res = model.sample(3, steps=4, seed=0)
    assert res.nfe == 7 and res.x.shape == (3, 1, 8, 8) and torch.isfinite(res.x).all()


def test_a_unet_folder_with_its_scheduler_config_beside_it(pipe, tmp_path):
    d = tmp_path / "unet_only"
    UNet2DModel.from_pretrained(pipe / "unet").save_pretrained(d)
    with pytest.raises(FewstepError, match="no scheduler config"):
        load_model(d)
    DDPMScheduler.from_pretrained(pipe / "scheduler").save_pretrained(d)
    x, s = _probe()
    with torch.no_grad():
        torch.testing.assert_close(load_model(d).denoiser(x, s), load_model(pipe).denoiser(x, s), rtol=0, atol=0)


def test_save_and_reload_is_exact_and_the_config_is_plain_json(pipe, tmp_path):
    model = load_model(pipe)
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["net"]["name"] == "diffusers" and cfg["net"]["class"] == "UNet2DModel"
    assert "_name_or_path" not in cfg["net"]["config"]  # where it was loaded from is not part of the model
    assert cfg["precond"]["name"] == "vp-discrete" and len(cfg["precond"]["alphas_cumprod"]) == 1000
    back = load_model(tmp_path / "m")
    x, s = _probe()
    with torch.no_grad():
        torch.testing.assert_close(back.denoiser(x, s), model.denoiser(x, s), rtol=0, atol=0)
    torch.testing.assert_close(back.denoiser.alphas_cumprod, model.denoiser.alphas_cumprod, rtol=0, atol=0)


def test_python_api_wraps_objects_and_rejects_other_unets():
    model = diffusers_model(tiny_unet(num_class_embeds=3), DDPMScheduler(num_train_timesteps=50).config)
    assert model.data_info.num_classes == 3 and model.denoiser.num_timesteps == 50
    with pytest.raises(FewstepError, match="UNet2DModel"):
        diffusers_model(torch.nn.Conv2d(1, 1, 1), DDPMScheduler().config)


def test_bad_folders_get_clear_errors(pipe, tmp_path):
    d = tmp_path / "bin_only"
    UNet2DModel.from_pretrained(pipe / "unet").save_pretrained(d, safe_serialization=False)
    DDPMScheduler().save_pretrained(d)
    with pytest.raises(FewstepError, match="pickle"):
        load_model(d)
    cond = tmp_path / "cond"
    cond.mkdir()
    (cond / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    DDPMScheduler().save_pretrained(cond)
    with pytest.raises(FewstepError, match="UNet2DConditionModel"):
        load_model(cond)


def test_sid_starts_from_the_teacher_and_its_gradient_vanishes_there(pipe):
    """Generator and fake score are copies of the diffusers teacher: x_g = D(σ_init·z, σ_init), and
    with f_ψ = f_φ the SiD loss and its gradient are exactly 0 (DESIGN §3)."""
    teacher = load_model(pipe)
    cls = get_method("sid")
    method = cls.create(cls.Config(), teacher=teacher)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(method.G.parameters(), teacher.denoiser.parameters()))
    z = _probe()[0]
    x_g = one_step_generate(method.G, z, 2.5)
    with torch.no_grad():
        torch.testing.assert_close(x_g, teacher.denoiser(2.5 * z, torch.full((4,), 2.5)), rtol=0, atol=0)
    per, info = sid_generator_loss(x_g, teacher.denoiser, method.fake, alpha=1.2)
    per.sum().backward()
    assert per.abs().max() == 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.G.parameters())


def test_distill_from_the_command_line_then_sample_and_resume(pipe, tmp_path, capsys):
    common = ["distill", "sid", "--teacher", str(pipe), "--batch-size", "8", "--no-progress",
              "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "0.016"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(common + ["--out", str(straight), "--total-kimg", "0.048"]) == 0
    assert main(common + ["--out", str(resumed), "--total-kimg", "0.024"]) == 0
    assert main(common + ["--out", str(resumed), "--total-kimg", "0.048"]) == 0
    assert "resumed from state-" in (resumed / "log.txt").read_text()
    student = load_model(straight)
    assert student.is_generator and student.config["precond"]["name"] == "vp-discrete"
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed bit-exactly
    teacher = load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[f"model.unet.{k}"], v) for k, v in teacher.items())  # it trained
    res = student.sample(5, seed=2)
    assert res.nfe == 1 and res.x.shape == (5, 1, 8, 8) and torch.isfinite(res.x).all()
    capsys.readouterr()
    assert main(["sample", str(straight), "--n", "6", "--out", str(tmp_path / "s.npz")]) == 0


@pytest.mark.parametrize("method,extra", [("diff-instruct", []), ("dmd", []),
                                          ("kd", ["--n-pairs", "16", "--steps", "3"]),
                                          ("progressive", ["--data", "digits", "--start-steps", "4"])])
def test_every_method_distils_a_diffusers_teacher(pipe, tmp_path, method, extra):
    out = tmp_path / method
    assert main(["distill", method, "--teacher", str(pipe), "--out", str(out), "--total-kimg", "0.032",
                 "--batch-size", "8", *QUIET, *extra]) == 0
    student = load_model(out)
    assert student.config["net"]["name"] == "diffusers"
    assert student.data_info.name == ("digits" if "--data" in extra else "diffusers")  # the data it was given
    assert torch.isfinite(student.sample(3, seed=0).x).all()


def test_consistency_distillation_of_a_diffusers_teacher_inside_its_noise_table(pipe, tmp_path, capsys):
    lo = load_model(pipe).denoiser.sigma_min  # the table's smallest σ: the grid may not go below it
    base = ["distill", "cd", "--teacher", str(pipe), "--data", "digits", "--total-kimg", "0.032", "--batch-size", "8",
            *QUIET]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "low")]) == 2
    err = capsys.readouterr().err
    suggested = err.split("--sigma-min ")[1].split()[0]  # the value the message suggests is accepted as printed
    assert float(suggested) == pytest.approx(lo, rel=1e-6)
    assert main(base + ["--out", str(tmp_path / "high"), "--sigma-min", suggested, "--sigma-max", "1e6"]) == 2
    high = capsys.readouterr().err.split("--sigma-max ")[1].split()[0]
    assert main(base + ["--out", str(tmp_path / "cd"), "--sigma-min", suggested, "--sigma-max", high]) == 0
    student = load_model(tmp_path / "cd")
    assert student.config["precond"]["name"] == "consistency"
    assert student.config["precond"]["inner"]["name"] == "vp-discrete"
    x = torch.randn(3, 1, 8, 8)
    s = torch.full((3,), student.denoiser.sigma_min)
    with torch.no_grad():
        assert torch.equal(student.denoiser(x, s), x)  # the boundary condition, around a diffusers UNet too
    for steps in (1, 2):
        res = student.sample(3, seed=0, steps=steps)
        assert res.nfe == steps and torch.isfinite(res.x).all()
    with pytest.raises(FewstepError, match="consistency model"):
        from fewstep.teachers.diffusers_adapter import save_diffusers

        save_diffusers(student, tmp_path / "export")


def test_what_a_diffusers_teacher_cannot_do_is_said_up_front(pipe, tmp_path, capsys):
    def err(*args):
        capsys.readouterr()
        assert main(list(args)) == 2
        return capsys.readouterr().err

    base = ["--teacher", str(pipe), "--out", str(tmp_path / "r"), "--total-kimg", "0.016", "--batch-size", "8", *QUIET]
    assert "--data" in err("distill", "sid", *base, "--eval-n", "10")  # no dataset to compare with
    assert "--data" in err("distill", "sida", *base)  # trains on data
    assert "fewstep UNet" in err("distill", "sida", *base, "--data", "digits")  # no encoder to read
    assert "--prediction x or v" in err("distill", "progressive", *base, "--data", "digits", "--prediction", "both")
    assert "shape [1, 28, 28]" in err("distill", "sid", *base, "--data", "mnist5k")  # not the teacher's images


def test_the_shipped_diffusers_benchmark_teacher_and_student_load_and_sample():
    """benchmarks/diffusers_teacher.py ships its teacher (a diffusers pipeline folder) and student."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    teacher = load_model(root / "diffusers-digits-teacher")
    student = load_model(root / "students" / "sid-diffusers-digits")
    assert (root / "diffusers-digits-teacher" / "model_index.json").is_file()
    assert teacher.config["precond"]["name"] == student.config["precond"]["name"] == "vp-discrete"
    assert student.is_generator and student.config["net"]["config"] == teacher.config["net"]["config"]
    for m, steps, nfe in ((teacher, 2, 3), (student, None, 1)):
        res = m.sample(4, steps=steps, seed=0)
        assert res.nfe == nfe and res.x.shape == (4, 1, 8, 8) and torch.isfinite(res.x).all()


def test_export_a_student_to_diffusers_and_back(pipe, tmp_path, capsys):
    """`fewstep export RUN --out DIR`: a DDPMPipeline folder fewstep reads back as the same one-step
    student, and plain diffusers code samples as fewstep does (this UNet predicts v: x̂_0 = α·x_t − σ_t·v̂)."""
    run = tmp_path / "run"
    assert main(["distill", "sid", "--teacher", str(pipe), "--out", str(run), "--total-kimg", "0.016",
                 "--batch-size", "8", *QUIET]) == 0
    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"]["sampler"] == "one-step"
    student, back = load_model(run), load_model(out)
    assert back.is_generator and back.sampling == student.sampling and back.data_info.name == "diffusers"
    a, b = student.sample(6, seed=4).x, back.sample(6, seed=4).x
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # ᾱ round-trips through float32 β
    # plain diffusers: the UNet at the recorded timestep on x_t = σ·z/√(1+σ²), then v → x̂_0
    from fewstep.diffusion.samplers import initial_noise

    info = json.loads((out / "fewstep.json").read_text())["one_step"]
    unet = UNet2DModel.from_pretrained(out / "unet").eval()
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    sigma, z = info["sigma_init"], initial_noise((6, 1, 8, 8), 4, "cpu")
    x_t = info["input_scale"] * sigma * z
    with torch.no_grad():
        v = unet(x_t, torch.full((6,), info["timestep"])).sample
    alpha, sig_t = info["input_scale"], sigma * info["input_scale"]
    torch.testing.assert_close(alpha * x_t - sig_t * v, a, rtol=1e-4, atol=1e-4)  # x̂_0 = α·x_t − σ_t·v
    assert info["recipe"].endswith("x0 = input_scale * (x_t - sigma_init * out)")  # the same, spelled out


def test_export_round_trips_a_teacher_and_refuses_fewstep_networks(pipe, tmp_path, capsys):
    teacher = load_model(pipe)
    capsys.readouterr()
    assert main(["export", str(pipe), "--out", str(tmp_path / "t")]) == 0
    back = load_model(tmp_path / "t")
    assert back.sampling == teacher.sampling and not back.is_generator
    x, s = _probe()
    with torch.no_grad():
        torch.testing.assert_close(back.denoiser(x, s), teacher.denoiser(x, s), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["export", "shipped:digits", "--out", str(tmp_path / "f")]) == 2
    assert "diffusers UNet2DModel" in capsys.readouterr().err


def test_step_distillation_refuses_a_cosine_grid_above_the_teachers_table():
    from fewstep.methods.progressive import Progressive, ProgressiveConfig

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # σ_max ≈ 14.6
    teacher = diffusers_model(tiny_unet(), sched)
    top = teacher.denoiser.sigma_max
    assert 14 < top < 15
    with pytest.raises(FewstepError, match=r"ends at σ = 14\.6.*--sigma-max 14\.6"):
        Progressive.create(ProgressiveConfig(start_steps=4), teacher=teacher)
    m = Progressive.create(ProgressiveConfig(start_steps=4, sigma_max=top), teacher=teacher)
    assert m.export_config()["sampling"]["sigma_max"] == pytest.approx(top)


def test_export_keeps_learned_variance_integer_timesteps_and_the_null_class(tmp_path):
    from fewstep.teachers.diffusers_adapter import load_diffusers_folder, save_diffusers

    torch.manual_seed(0)
    two = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4).eval()  # ε and the learned variance's interpolation channel
    lv = diffusers_model(two, DDPMScheduler(variance_type="learned_range"))
    assert lv.denoiser.model.learned_variance
    back = load_diffusers_folder(save_diffusers(lv, tmp_path / "lv"))
    assert back.denoiser.model.learned_variance
    torch.testing.assert_close(back.sample(2, steps=2, seed=0).x, lv.sample(2, steps=2, seed=0).x, rtol=1e-4, atol=1e-4)
    cond = diffusers_model(tiny_unet(num_class_embeds=4), DDPMScheduler(), quantize=True, has_null_class=True)
    back = load_diffusers_folder(save_diffusers(cond, tmp_path / "cond"))
    assert back.denoiser.quantize and back.denoiser.model.has_null_class and back.denoiser.num_classes == 3
    torch.testing.assert_close(back.sample(3, steps=2, seed=0).x, cond.sample(3, steps=2, seed=0).x, rtol=1e-4,
                               atol=1e-4)
