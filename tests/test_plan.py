"""The fit planner: profiles, the memory estimate against every saved measurement, advice, and `train --fit`."""

from __future__ import annotations

import json
import math

import pytest

from appliance import plan
from appliance.config import profiles_dir
from appliance.plan import (
    SEQ_STEP,
    TrainSettings,
    estimate,
    find_gpu,
    find_model,
    load_measurements,
    max_batch_size,
    max_seq_len,
    recommend,
)
from conftest import DEMO, run_cli

REQUIRED_GPUS = ["RTX 3060", "RTX 3080", "RTX 3090", "RTX 4060 Ti", "RTX 4070", "RTX 4080", "RTX 4090", "RTX 5090", "A100 40GB", "A100 80GB", "H100"]
REQUIRED_MODELS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b"]
TOLERANCE = 0.15


def test_every_measurement_is_within_tolerance_of_the_estimate():
    """The issue's H100 peer figures, and every GPU measurement `appliance bench train --save` adds."""
    measurements = load_measurements()
    assert len(measurements) >= 3
    rows = []
    for m in measurements:
        e = estimate(find_model(m.model), find_gpu(m.gpu), m.settings, m.loop)
        error = (e.allocated_gib - m.peak_gib) / m.peak_gib
        rows.append((m.model, m.loop, "4-bit" if m.settings.load_in_4bit else "16-bit", m.peak_gib, e.allocated_gib, error))
    print("\nmodel           loop       weights  measured GiB  estimated GiB  error")
    for model, loop, weights, measured, estimated, error in rows:
        print(f"{model:<15} {loop:<10} {weights:<8} {measured:>12.2f} {estimated:>14.2f} {error:>+6.1%}")
    assert all(abs(r[-1]) <= TOLERANCE for r in rows), rows


def test_logits_budget_is_the_training_loss_budget():
    from appliance.metrics import lm as losses

    assert plan.LOGITS_BUDGET_BYTES == losses.LOGITS_BUDGET_BYTES
    for vocab in (49152, 128256, 151936):
        assert plan.chunk_rows(vocab) == losses.chunk_rows(vocab)


@pytest.mark.parametrize("name", REQUIRED_GPUS)
def test_gpu_profiles_exist_with_sources(name):
    gpu = find_gpu(name)
    assert gpu.vram_gib > 0
    assert gpu.bf16_tflops and gpu.bandwidth_gbps
    # The driver reports less than the box says: a little less, never more.
    assert gpu.usable_gib is not None and 0.95 * gpu.vram_gib < gpu.usable_gib < gpu.vram_gib
    source = next(p for p in (profiles_dir() / "gpus").glob("*.yaml") if f"name: {gpu.name}\n" in p.read_text())
    for field in ("vram_gib", "usable_gib", "bf16", "bf16_tflops", "bandwidth_gbps"):
        line = next(line for line in source.read_text().splitlines() if line.startswith(field + ":"))
        assert "#" in line, f"{source}: {field} names no source"


def test_a_plan_compares_with_the_usable_memory_not_the_box():
    shape, gpu = find_model("llama-3.1-8b"), find_gpu("RTX 3060")
    settings = TrainSettings(seq_len=2048, batch_size=1)
    as_if_all = gpu.model_copy(update={"usable_gib": None})  # the box's 12 GiB
    longest, longest_on_the_box = max_seq_len(shape, gpu, settings), max_seq_len(shape, as_if_all, settings)
    assert longest < longest_on_the_box
    between = estimate(shape, gpu, settings.model_copy(update={"seq_len": longest_on_the_box}))
    keep = 1 - plan.constants.FIT_MARGIN
    assert gpu.usable_gib * keep < between.total_gib <= gpu.vram_gib * keep and not between.fits
    assert (between.gpu_gib, between.nominal_gib) == (gpu.usable_gib, gpu.vram_gib)


def test_paged_optimizer_states_count_against_the_card_but_not_the_allocator():
    """bitsandbytes pages them in CUDA unified memory: in GPU memory while it fits, invisible to
    torch.cuda.max_memory_allocated() (what the peer figures measured)."""
    shape, gpu = find_model("llama-3.1-8b"), find_gpu("RTX 4090")
    paged = estimate(shape, gpu, TrainSettings(rank=64, optimizer="paged_adamw_8bit"))
    plain = estimate(shape, gpu, TrainSettings(rank=64, optimizer="adamw_8bit"))
    states = paged.parts["optimizer_states"]
    assert states.gib == pytest.approx(plain.parts["optimizer_states"].gib) and states.gib > 0.1
    assert not states.allocated and plain.parts["optimizer_states"].allocated
    assert paged.allocated_gib == pytest.approx(plain.allocated_gib - states.gib)
    assert paged.total_gib == pytest.approx(paged.allocated_gib + states.gib + paged.parts["cuda_context"].gib + paged.parts["allocator_slack"].gib)


def test_the_packed_sequence_mask_is_planned_where_transformers_builds_it():
    """A (rows, 1, W, W) bool mask for the step, and its additive bf16 copy in the recomputed block:
    768 MiB at W=8192 with 4 rows (review: gpu-first-run §3.1)."""
    shape, gpu = find_model("llama-3.2-1b"), find_gpu("H100")
    packed = estimate(shape, gpu, TrainSettings(seq_len=8192, batch_size=4))
    assert packed.moments["loss"]["packed_mask"] * 2**30 == 4 * 8192**2
    assert packed.moments["backward"]["packed_mask"] * 2**30 == 3 * 4 * 8192**2
    # One full example per row needs no mask: a single example, or continued pre-training's full blocks.
    assert "packed_mask" not in estimate(shape, gpu, TrainSettings(seq_len=8192, batch_size=1)).parts
    assert "packed_mask" not in estimate(shape, gpu, TrainSettings(task="cpt", seq_len=8192, batch_size=4)).parts
    assert "packed_mask" in estimate(shape, gpu, TrainSettings(task="cpt", seq_len=8192, batch_size=4, packed=True)).parts


def test_driver_names_and_close_matches():
    assert find_gpu("NVIDIA GeForce RTX 3060").name == find_gpu("rtx3060").name
    with pytest.raises(Exception) as err:
        find_gpu("RTX 3070 Ti Super")
    assert "RTX 3060" in str(err.value) or "RTX 3080" in str(err.value)


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_model_profiles(name):
    shape = find_model(name)
    assert shape.hidden_size % shape.num_attention_heads == 0
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert shape.end_of_turn


def test_a_stored_model_is_planned_from_its_own_config(tiny):
    shape = find_model("tiny", tiny)
    assert (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size) == (64, 2, 49152)


def test_longest_sequence_and_largest_batch_are_the_edges_of_fitting():
    shape, gpu = find_model("llama-3.1-8b"), find_gpu("RTX 3060")
    settings = TrainSettings(seq_len=2048, batch_size=1)
    longest = max_seq_len(shape, gpu, settings)
    assert estimate(shape, gpu, settings.model_copy(update={"seq_len": longest})).fits
    if longest + SEQ_STEP <= shape.max_position_embeddings:
        assert not estimate(shape, gpu, settings.model_copy(update={"seq_len": longest + SEQ_STEP})).fits
    largest = max_batch_size(shape, gpu, settings)
    assert estimate(shape, gpu, settings.model_copy(update={"batch_size": largest})).fits
    assert not estimate(shape, gpu, settings.model_copy(update={"batch_size": largest + 1})).fits


def test_more_memory_for_more_tokens_rank_and_16_bit():
    shape, gpu = find_model("llama-3.2-1b"), find_gpu("RTX 4090")
    base = estimate(shape, gpu, TrainSettings()).total_gib
    assert estimate(shape, gpu, TrainSettings(seq_len=4096)).total_gib > base
    assert estimate(shape, gpu, TrainSettings(rank=64)).total_gib > base
    assert estimate(shape, gpu, TrainSettings(load_in_4bit=False)).total_gib > base
    assert estimate(shape, gpu, TrainSettings(gradient_checkpointing=False)).total_gib > base


def test_recommendations_come_in_order_of_cost_each_lowering_memory():
    shape, gpu = find_model("llama-3.1-8b"), find_gpu("RTX 3060")
    settings = TrainSettings(seq_len=8192, batch_size=4, rank=64, load_in_4bit=False, gradient_checkpointing=False)
    before = estimate(shape, gpu, settings)
    assert not before.fits
    advice = recommend(shape, gpu, settings)
    fields = [c.field for r in advice for c in r.changes]
    assert fields.index("seq_len") < fields.index("gradient_checkpointing") < fields.index("batch_size") < fields.index("load_in_4bit") < fields.index("rank")
    assert all(r.total_gib < before.total_gib for r in advice)
    micro = next(r for r in advice if any(c.field == "batch_size" for c in r.changes))
    values = {c.field: c.value for c in micro.changes}
    assert values["batch_size"] * values["grad_accum"] == 4  # the examples per step are kept
    assert recommend(shape, gpu, TrainSettings(seq_len=512)) == []  # nothing to say when it fits


def test_time_estimate_interpolates_between_measured_sizes():
    """Between the two measured peer points (1B and 8B on an H100), a 3B run is planned from both:
    its efficiency lies between theirs, placed by log FLOPs per token, and its speed between theirs."""
    gpu, settings = find_gpu("H100"), TrainSettings(seq_len=2048, batch_size=1)
    measured = {m.model: m for m in load_measurements() if m.loop == "peer" and m.gpu == gpu.name and m.tokens_per_s and m.settings.load_in_4bit}
    small, large = measured["llama-3.2-1b"], measured["llama-3.1-8b"]

    def efficiency(m):
        return m.tokens_per_s * plan.flops_per_token(find_model(m.model), m.settings) / (gpu.bf16_tflops * 1e12)

    f_small, f_large = (plan.flops_per_token(find_model(n), settings) for n in ("llama-3.2-1b", "llama-3.1-8b"))
    f_mid = plan.flops_per_token(find_model("llama-3.2-3b"), settings)
    assert f_small < f_mid < f_large
    mid = plan.estimate_time(find_model("llama-3.2-3b"), gpu, settings, steps=100, loop="peer", measurements=[small, large])
    share = math.log(f_mid / f_small) / math.log(f_large / f_small)
    assert mid.calibration.efficiency == pytest.approx(efficiency(small) + share * (efficiency(large) - efficiency(small)), rel=1e-9)
    assert min(efficiency(small), efficiency(large)) < mid.calibration.efficiency < max(efficiency(small), efficiency(large))
    assert large.tokens_per_s < mid.tokens_per_s < small.tokens_per_s
    assert len(mid.calibration.basis) == 2
    assert mid.run_s == pytest.approx(100 * 2048 / mid.tokens_per_s, rel=1e-9)
    # Outside the measured sizes the nearest one's efficiency holds, and one point alone is all there is.
    alone = plan.estimate_time(find_model("llama-3.1-8b"), gpu, settings, steps=1, loop="peer", measurements=[small])
    assert alone.calibration.efficiency == pytest.approx(efficiency(small)) and len(alone.calibration.basis) == 1
    assert plan.estimate_time(find_model("llama-3.1-8b"), gpu, settings, steps=1, loop="peer", measurements=[]) is None


def test_gradient_checkpointing_auto(tiny):
    import torch

    from appliance.config import LoraSpec, ModelSpec
    from appliance.train.model import checkpointing_for

    folder = tiny.model_dir("tiny")
    assert checkpointing_for(ModelSpec(gradient_checkpointing=False), LoraSpec(), "cuda", torch.bfloat16, folder, 10**6)[0] is False
    assert checkpointing_for(ModelSpec(), LoraSpec(), "cuda", torch.bfloat16, folder, 16)[0] is True
    on, why = checkpointing_for(ModelSpec(), LoraSpec(), "cpu", torch.float32, folder, 4096)
    assert on is False and "free RAM" in why
    assert checkpointing_for(ModelSpec(), LoraSpec(), "cpu", torch.float32, folder, 10**12)[0] is True


# -- the CLI ------------------------------------------------------------------------------------


def test_plan_json(smollm2):
    proc = run_cli("plan", "--model", "smollm2", "--gpu", "RTX 3060", "--seq-len", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("total_gib", "gpu_gib", "fits", "parts", "max_seq_len", "recommendations"):
        assert key in result
    assert result["fits"] is True and result["nominal_gib"] == 12 and result["gpu_gib"] == find_gpu("RTX 3060").usable_gib < 12
    assert result["total_gib"] == pytest.approx(sum(result["parts"].values()), abs=0.01)


def test_plan_table_for_a_profile_not_downloaded():
    proc = run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "RTX 3060", "--seq-len", "8192", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    for words in ("4-bit NF4", "lora weights", "optimizer", "activations", "logits", "does not fit", "longest sequence", "to make it fit"):
        assert words in proc.stdout, words


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "llama-3.2-1b", "--gpu", "RTX 3070 Ti Super"], "RTX 30"),
        (["--model", "llama-9-400b", "--gpu", "RTX 3060"], "profiles/models"),
        (["--model", "llama-3.2-1b", "--gpu", "RTX 3060", "--seq-len", "1000000"], "context"),
        (["--model", "llama-3.2-1b", "--gpu", "RTX 3060", "--rank", "0"], "rank"),
    ],
)
def test_plan_bad_inputs(args, words):
    proc = run_cli("plan", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert words in proc.stderr + proc.stdout


TOO_BIG = ["--gpu", "RTX 3080", "--set", "data.seq_len=8192", "--batch-size", "34", "--steps", "1"]


def test_train_refuses_a_run_that_does_not_fit(smollm2):
    proc = run_cli("train", "--model", "smollm2", "--data", str(DEMO / "facts.jsonl"), "--name", "big", *TOO_BIG)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "--fit" in out and "sequences of at most" in out
    assert not (smollm2.store.root / "adapters" / "big").exists()


def test_train_fit_applies_the_cheapest_change(smollm2):
    proc = run_cli("train", "--model", "smollm2", "--data", str(DEMO / "facts.jsonl"), "--name", "big", *TOO_BIG, "--fit")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "--fit: sequences of at most" in out
    config = json.loads((smollm2.store.root / "adapters" / "big" / "manifest.json").read_text())["config"]
    assert config["data"]["seq_len"] < 8192 and config["train"]["batch_size"] == 34  # the cheapest change only


def test_a_plan_for_the_detected_gpu_is_against_what_others_leave_free(monkeypatch):
    """With the appliance service holding 92 % of an RTX 3060, a run that fits the card does not fit now."""
    import appliance.hardware as hardware
    from appliance.plan import detected_gpu, estimate, find_model

    def card(free_gib):
        total = int(11.75 * 2**30)
        return hardware.Hardware("cuda", "NVIDIA GeForce RTX 3060", total, True, 16, free_bytes=int(free_gib * 2**30), capability=(8, 6))

    shape, settings = find_model("llama-3.2-1b"), TrainSettings(seq_len=2048, batch_size=1)
    monkeypatch.setattr(hardware, "detect", lambda: card(11.2))  # only this process's context in use
    idle = detected_gpu()
    assert idle.held_gib == pytest.approx(0.05, abs=0.01) and estimate(shape, idle, settings).fits
    monkeypatch.setattr(hardware, "detect", lambda: card(0.9))  # vLLM took 0.92 of the card
    busy = detected_gpu()
    planned = estimate(shape, busy, settings)
    assert busy.held_gib == pytest.approx(10.35, abs=0.01) and not planned.fits and planned.held_gib == busy.held_gib
    assert planned.gpu_gib == pytest.approx(11.75 - 10.35, abs=0.01)


# -- published measurements, the estimate's basis and its spread ---------------------------


def test_a_consumer_card_is_calibrated_on_runs_published_for_it():
    """torchtune's published RTX 4090 runs (in the profile, with their source): the 8B QLoRA
    estimate is their throughput, a 16-bit plan uses their LoRA run, and the basis says what differs."""
    gpu, shape = find_gpu("4090"), find_model("llama-3.1-8b")
    published = {p.settings.load_in_4bit: p for p in gpu.published}
    assert published[True].tokens_per_s == 2413 and "github.com/pytorch/torchtune" in published[True].source
    like = published[True].settings
    qlora = plan.estimate_time(shape, gpu, like, steps=10)
    assert qlora.tokens_per_s == pytest.approx(2413, rel=1e-6)
    assert "torchtune" in qlora.calibration.basis[0] and published[True].source in qlora.calibration.basis[0]
    assert any("appliance loop is not measured" in c for c in qlora.calibration.caveats)
    lora = plan.estimate_time(shape, gpu, like.model_copy(update={"load_in_4bit": False}), steps=10)
    assert lora.tokens_per_s > 1.2 * qlora.tokens_per_s and "16-bit" in lora.calibration.basis[0]


def test_a_card_without_runs_borrows_the_most_alike_card_and_says_so():
    """An RTX 3060 has no measured run: the 4090's (nearest in compute per byte of bandwidth) stands
    in, the caveat names it, and the H100 peer runs widen the spread."""
    gpu, shape = find_gpu("RTX 3060"), find_model("llama-3.1-8b")
    t = plan.estimate_time(shape, gpu, TrainSettings(seq_len=2048, batch_size=2), steps=10)
    assert "RTX 4090" in t.calibration.basis[0]
    assert any("measured on RTX 4090, not RTX 3060" in c for c in t.calibration.caveats)
    low, high = t.tokens_per_s_range
    assert low < t.tokens_per_s <= high * 1.000001  # the H100 peer loop's share of peak is far lower


def test_the_peer_loop_is_planned_from_its_own_runs_where_they_exist():
    gpu, shape = find_gpu("H100"), find_model("llama-3.1-8b")
    settings = TrainSettings(seq_len=2048, batch_size=1)
    peer = plan.estimate_time(shape, gpu, settings, steps=10, loop="peer")
    assert peer.tokens_per_s == pytest.approx(2272, rel=1e-6) and peer.calibration.caveats == []
    ours = plan.estimate_time(shape, gpu, settings, steps=10, loop="appliance")
    assert any("appliance loop is not measured" in c for c in ours.calibration.caveats)


def test_fits_keeps_a_margin_free():
    """11.98 of 12 GiB is not a fit: a plan keeps FIT_MARGIN of the usable memory free."""
    shape, settings = find_model("llama-3.2-1b"), TrainSettings(seq_len=1024, batch_size=1)
    total = estimate(shape, find_gpu("RTX 3060"), settings).total_gib
    tight = plan.GpuProfile(name="tight", vram_gib=total * 1.01, usable_gib=total * 1.001, bf16=True)
    roomy = plan.GpuProfile(name="roomy", vram_gib=total * 1.2, usable_gib=total / (1 - plan.constants.FIT_MARGIN) * 1.001, bf16=True)
    assert not estimate(shape, tight, settings).fits and estimate(shape, roomy, settings).fits
    proc = run_cli("plan", "--model", "llama-3.2-1b", "--gpu-memory", f"{total + 0.36 + 0.01:.3f}", "--seq-len", "1024", "--batch-size", "1")
    assert proc.returncode == 0 and "too close to fit" in proc.stdout, proc.stdout + proc.stderr


def test_sequences_beyond_the_measured_ones_are_marked():
    longest = plan.longest_measured_seq_len()
    assert longest >= 2048
    proc = run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--batch-size", "1", "--json")
    result = json.loads(proc.stdout)
    assert result["measured_seq_len"] == longest and result["max_seq_len"] > longest
    text = run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--batch-size", "1", "--seq-len", str(longest * 2)).stdout
    assert "extrapolated" in text and "beyond" in text


def test_a_70b_model_is_planned_and_the_weights_alone_are_named():
    proc = run_cli("plan", "--model", "llama-3.3-70b", "--gpu", "4090")
    assert proc.returncode == 0, proc.stderr
    assert "does not fit" in proc.stdout and "weights alone" in " ".join((proc.stdout + proc.stderr).split())
    fits = json.loads(run_cli("plan", "--model", "llama-3.1-70b", "--gpu", "H100", "--seq-len", "1024", "--batch-size", "1", "--json").stdout)
    assert fits["fits"] and 35 < fits["parts"]["linear_weights"] + fits["parts"]["kept_weights"] < 40


def test_a_model_given_as_a_folder_or_config_json(tmp_path, tiny_model_folder):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_folder / "config.json").read_text())
    for given in (folder, folder / "config.json"):
        proc = run_cli("plan", "--model", str(given), "--gpu", "RTX 3060", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["model"] == "my-model"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "./no-such-folder/config.json", "--gpu", "RTX 3060"], "does not exist"),
        (["--model", "llama-3.2-1b", "--gpu", "RTX 3060", "--gpu-memory", "12"], "give one"),
        (["--model", "llama-3.2-1b", "--gpu-memory", "0"], "--gpu-memory"),
        (["--model", "llama-3.2-1b", "--gpu", "A6000"], "--gpu-memory"),
    ],
)
def test_plan_bad_card_and_model_paths(args, words):
    proc = run_cli("plan", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and words in out, out


def test_an_unlisted_card_by_its_memory():
    result = json.loads(run_cli("plan", "--model", "llama-3.1-8b", "--gpu-memory", "16", "--json").stdout)
    assert result["nominal_gib"] == 16 and result["gpu_gib"] == pytest.approx(16 - plan.constants.DRIVER_KEEPS_GIB)
    assert result["time"] is None  # its TFLOP/s are unknown


def test_user_profiles_outside_the_package(tmp_path):
    """$APPLIANCE_PROFILES (conftest points it at tmp_path/profiles) adds cards and replaces shipped profiles by file name."""
    gpus = tmp_path / "profiles" / "gpus"
    gpus.mkdir(parents=True)
    (gpus / "rtx-a6000.yaml").write_text("name: RTX A6000\naliases: [A6000]\nvram_gib: 48\nusable_gib: 47.5\nbf16: true\n")
    (gpus / "rtx-3060.yaml").write_text("name: RTX 3060\nvram_gib: 12\nusable_gib: 11.0\nbf16: true\n")
    assert find_gpu("A6000").usable_gib == 47.5 and find_gpu("RTX 3060").usable_gib == 11.0
    result = json.loads(run_cli("plan", "--model", "llama-3.2-1b", "--gpu", "A6000", "--json").stdout)
    assert result["gpu"] == "RTX A6000" and result["gpu_gib"] == 47.5
    recipes = tmp_path / "profiles" / "recipes"
    recipes.mkdir()
    (recipes / "my-sft.yaml").write_text((profiles_dir() / "recipes" / "sft-qlora.yaml").read_text())
    from appliance.config import recipe_path

    assert recipe_path("my-sft") == recipes / "my-sft.yaml"


def test_planning_a_run_on_this_machines_cpu():
    result = json.loads(run_cli("plan", "--model", "smollm2-135m", "--gpu", "cpu", "--json").stdout)
    assert "cuda_context" not in result["parts"] and "process" in result["parts"]
    assert result["settings"]["optimizer"] == "adamw" and result["settings"]["gradient_checkpointing"] is False
    assert result["time"] is None
    # On a machine without a GPU, a plan without --gpu is for its CPU (this one has none).
    import torch

    if not torch.cuda.is_available():
        default = json.loads(run_cli("plan", "--model", "smollm2-135m", "--json").stdout)
        assert default["gpu"] == result["gpu"]


def test_data_parallel_plans_each_gpu_as_one_card_plus_the_all_reduce_and_says_the_speed_is_ideal():
    """torchrun DDP: every rank holds the whole 4-bit base, so memory per GPU is one card's plus
    the flat fp32 gradient buffer the all-reduce sends; a step takes N times the tokens."""
    one = json.loads(run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--json").stdout)
    two = json.loads(run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--gpus", "2", "--json").stdout)
    buffer = two["parts"]["allreduce_buffer"]
    assert "allreduce_buffer" not in one["parts"] and buffer == pytest.approx(one["parts"]["lora_weights"], abs=1e-3)
    # The buffer, and the allocator's rounding of it (the plan rounds each block up as PyTorch does).
    assert buffer <= two["total_gib"] - one["total_gib"] <= 1.25 * buffer
    assert two["time"]["tokens_per_s"] == pytest.approx(2 * one["time"]["tokens_per_s"], rel=1e-6)
    assert two["time"]["run_tokens"] == 2 * one["time"]["run_tokens"] and two["time"]["run_s"] == pytest.approx(one["time"]["run_s"], rel=1e-6)
    assert any("2 GPUs data-parallel" in c and "not measured" in c for c in two["time"]["calibration"]["caveats"])
    table = run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--gpus", "2")
    assert table.returncode == 0 and "per GPU of 2 (torchrun, data-parallel)" in " ".join(table.stdout.split())


def test_fsdp_plans_a_share_of_the_layers_per_gpu_and_a_load_in_host_memory():
    """--fsdp: each GPU keeps 1/N of the layers' 4-bit weights plus two layers whole (the one computing
    and the one prefetched). The whole base never sits on one GPU (it is quantized in host memory and
    sharded there), so a base larger than a card fits; the host holds it whole while a rank loads."""
    two = json.loads(run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--gpus", "2", "--json").stdout)
    sharded = json.loads(run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--gpus", "2", "--fsdp", "--json").stdout)
    whole, layers = two["parts"]["linear_weights"], find_model("llama-3.1-8b").num_hidden_layers
    assert sharded["parts"]["linear_weights"] == pytest.approx(whole / 2 + 2 * whole / layers, rel=1e-3)
    assert two["host_load_gib"] == 0 and sharded["host_load_gib"] >= whole + two["parts"]["kept_weights"] and sharded["fits"]
    shape, gpu = find_model("llama-3.1-70b"), find_gpu("RTX 4090")
    larger_than_a_card = estimate(shape, gpu, TrainSettings(seq_len=128, batch_size=1, data_parallel=8, fsdp=True, rank=8))
    assert larger_than_a_card.fits and larger_than_a_card.host_load_gib > gpu.usable_gib
    alone = run_cli("plan", "--model", "llama-3.1-8b", "--gpu", "4090", "--fsdp")
    assert alone.returncode == 2 and "--gpus 2" in alone.stdout + alone.stderr


@pytest.mark.bad_input
def test_train_refuses_an_fsdp_load_the_host_memory_cannot_hold():
    from appliance.cli.train import refuse_short_host_memory
    from appliance.errors import ApplianceError

    refuse_short_host_memory(38.0, free_gib=40.0)
    with pytest.raises(ApplianceError) as refused:
        refuse_short_host_memory(38.0, free_gib=30.0)
    assert "38.0 GiB" in str(refused.value) and "30.0 GiB are free" in str(refused.value) and "drop --fsdp" in refused.value.fix
