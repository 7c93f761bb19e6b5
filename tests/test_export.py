"""GGUF export: llama.cpp's own converter and quantizer, the Modelfile, the manifest, the parity
gate, refusals and a full disk on the tiny LLaMA; the round trip on SmolLM2 (slow): import,
train, merge, export q8_0, and llama.cpp answers a taught fact asked as a paraphrase it never saw,
stopping by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.errors import ApplianceError
from appliance.export import (
    FAMILIES,
    LLAMA_CPP_VERSION,
    QUANTS,
    ExportMismatch,
    ExportSpec,
    default_system_prompt,
    export,
    export_dir,
    exports_dir,
    list_exports,
    modelfile,
    template_family,
)
from appliance.train.loop import run_training
from conftest import DEMO, REPO, SmallFilesystem, run_cli
from test_train import tiny_config


def gguf_metadata(path, lora=None):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


@pytest.fixture
def trained(tiny):
    # A high rate for a few steps: the adapter moves the logits a lot, so a wrong LoRA would show.
    run_training(tiny_config(DEMO / "facts.jsonl", steps=6, lr=5e-3), tiny, "a")
    return tiny


# -- a model ------------------------------------------------------------------------------------------


def test_a_model_exports_as_one_gguf_with_template_ids_and_modelfile(tiny, tmp_path):
    from appliance.hf import load_tokenizer

    result = export(tiny, ExportSpec(name="tiny", quant="f16", out=tmp_path / "out"))
    m = result.manifest
    folder = export_dir(tiny, "tiny-f16")
    assert result.folder == folder and m.name == "tiny-f16" and m.kind == "model" and m.source == "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "export.log", "manifest.json", "tiny-f16.gguf"]  # no work files left
    assert "Model successfully exported" in (folder / "export.log").read_text()  # llama.cpp's converter said so
    assert m.files["tiny-f16.gguf"] == (folder / "tiny-f16.gguf").stat().st_size > 6_000_000
    assert m.source_fingerprint == tiny.model("tiny").fingerprint and m.llama_cpp == LLAMA_CPP_VERSION

    # The GGUF, read by llama.cpp: the model's own chat template and BOS / EOS / end-of-turn ids.
    meta = gguf_metadata(folder / m.gguf)
    tokenizer = load_tokenizer(tiny.model_dir("tiny"))
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == ("1", "2", "2")
    assert meta["general.file_type"] == "1"  # MOSTLY_F16
    assert (m.bos_token_id, m.eos_token_id, m.eot_token_id, m.chat_template) == (1, 2, 2, True)

    # The Modelfile: FROM beside it, ChatML in Go template syntax, SmolLM2's default system prompt, the stops.
    text = (folder / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf\n" in text and "ADAPTER" not in text
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text and "<|im_start|>{{ .Role }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and m.stop_tokens == ["<|im_end|>"]
    assert m.template_family == "chatml" and m.ollama_create == f"ollama create tiny -f {folder / 'Modelfile'}"

    # Parity: f16 of a bf16 model is exact but for llama.cpp's arithmetic.
    p = m.parity
    print(f"\ntiny f16 export parity: {p.agreement}")
    assert p.quant == "f16" and p.prompts == 4 and p.validation_examples == 0 and p.generations_from == "probes"
    assert p.agreement.positions > 50 and p.agreement.mean_kl < 1e-3 and p.agreement.top1_agreement_all > 0.95
    assert p.tokenization_matches == p.tokenization_checked == 4 and len(p.generations) == 4

    # --out holds the same files, byte for byte; the printed command points there.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.log", "manifest.json", "tiny-f16.gguf"]
    assert (out / "tiny-f16.gguf").read_bytes() == (folder / "tiny-f16.gguf").read_bytes()
    assert result.ollama_create == f"ollama create tiny -f {out / 'Modelfile'}"

    # Listed: `appliance exports`, and under `appliance models list`.
    assert [e.name for e in list_exports(tiny)] == ["tiny-f16"]
    listed = CliRunner().invoke(main, ["exports", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["parity"]["quant"] == "f16"
    models = CliRunner().invoke(main, ["models", "list"])
    assert models.exit_code == 0 and "GGUF exports" in models.output and "tiny-f16" in models.output


def test_a_quantized_export_goes_through_llama_cpp_s_quantizer(tiny):
    f16 = export(tiny, ExportSpec(name="tiny", quant="f16")).manifest
    q4 = export(tiny, ExportSpec(name="tiny", quant="q4_k_m")).manifest
    f16_bytes, q4_bytes = f16.files[f16.gguf], q4.files[q4.gguf]
    print(f"\ntiny: f16 {f16_bytes} bytes, q4_k_m {q4_bytes} bytes; q4_k_m parity {q4.parity.agreement}")
    # 0.63 measured: the vocabulary (~1.8 MB) is the same in both, and 64-wide rows fall back to q5_0 / q8_0.
    assert q4_bytes < 0.7 * f16_bytes
    meta = gguf_metadata(export_dir(tiny, "tiny-q4_k_m") / q4.gguf)
    assert meta["general.file_type"] == "15"  # MOSTLY_Q4_K_M
    assert meta["tokenizer.ggml.eot_token_id"] == "2" and meta["tokenizer.chat_template"]
    assert "falling back to" in (export_dir(tiny, "tiny-q4_k_m") / "export.log").read_text()  # 64-wide rows: not k-quant blocks
    assert "quantize_s" in q4.timings and q4.parity.agreement.mean_kl > f16.parity.agreement.mean_kl  # the rounding is real
    assert q4.parity.agreement.mean_kl <= QUANTS["q4_k_m"].gate.max_mean_kl


# -- an adapter ---------------------------------------------------------------------------------------


def test_an_adapter_exports_as_a_gguf_lora_beside_its_base(trained, tmp_path):
    import numpy as np
    import llama_cpp

    result = export(trained, ExportSpec(name="a", quant="f16", out=tmp_path / "out"))
    m = result.manifest
    folder = export_dir(trained, "a-lora-f16")
    assert m.kind == "adapter" and m.source == "a" and m.base == "tiny" and m.base_export == "tiny-f16" and m.lora == "a-lora-f16.gguf"
    assert result.base_export is not None and result.base_export.name == "tiny-f16"  # the base was exported first
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "a-lora-f16.gguf", "export.log", "manifest.json", "tiny-f16.gguf"]
    # The base's GGUF is the base export's own file (a hard link), so the folder is complete on its own.
    assert os.path.samefile(folder / "tiny-f16.gguf", export_dir(trained, "tiny-f16") / "tiny-f16.gguf")
    text = (folder / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf\nADAPTER ./a-lora-f16.gguf\n" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "a-lora-f16.gguf", "export.log", "manifest.json", "tiny-f16.gguf"]

    p = m.parity
    print(f"\ntiny adapter export parity: {p.agreement}")
    assert p.validation_examples == 2 and p.generations_from == "validation" and len(p.generations) == 2
    assert "peft" in p.reference and p.agreement.mean_kl < 1e-3
    # Six steps on random weights do not teach the tiny model to end its turn: said, not blamed on the export.
    if not all(g.reference_stopped for g in p.generations):
        assert any("does not stop" in note for note in p.notes)

    # The LoRA does something: llama.cpp's logits with it differ from the base alone far more than from the reference.
    prompt = llama_cpp.Llama(model_path=str(folder / m.gguf), n_ctx=64, verbose=False, vocab_only=True).tokenize(b"Hello there", add_bos=False)

    def logits(lora):
        llm = llama_cpp.Llama(model_path=str(folder / m.gguf), lora_path=lora, n_ctx=64, logits_all=True, verbose=False)
        llm.eval(prompt)
        out = np.array(llm.scores[: len(prompt)])
        llm.close()
        return out

    moved = np.abs(logits(str(folder / m.lora)) - logits(None)).max()
    assert moved > 20 * p.agreement.max_abs_logit_diff, (moved, p.agreement.max_abs_logit_diff)

    # A second adapter export at the same type reuses the base export.
    again = export(trained, ExportSpec(name="a", quant="f16", overwrite=True))
    assert again.base_export is None and again.manifest.base_export == "tiny-f16"


def test_a_wrong_lora_fails_the_gate_and_keeps_nothing(trained, monkeypatch, tmp_path):
    """A LoRA converted with ten times its alpha does not match base + adapter: refused, no folder left."""
    import appliance.export.build as exp

    real = exp.convert_lora

    def tenfold(tools, adapter_dir, base_dir, out, log, progress):
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config["lora_alpha"] *= 10
        (wrong / "adapter_config.json").write_text(json.dumps(config))
        os.link(adapter_dir / "adapter_model.safetensors", wrong / "adapter_model.safetensors")
        real(tools, wrong, base_dir, out, log, progress)

    monkeypatch.setattr(exp, "convert_lora", tenfold)
    with pytest.raises(ExportMismatch, match="does not match tiny \\+ a") as caught:
        export(trained, ExportSpec(name="a", quant="f16"))
    print(f"\nten-fold LoRA: {caught.value.parity.agreement}")
    assert caught.value.parity.agreement.mean_kl > QUANTS["f16"].gate.max_mean_kl
    assert not export_dir(trained, "a-lora-f16").exists()
    assert not [p for p in exports_dir(trained).iterdir() if p.name.startswith(".tmp-")]
    assert (export_dir(trained, "tiny-f16") / "manifest.json").is_file()  # the base's own export passed and stays


def test_export_refuses_before_any_work(tiny, tmp_path):
    with pytest.raises(ApplianceError, match="(?s)Unknown GGUF type 'q4_km'.*did you mean q4_k_m"):
        export(tiny, ExportSpec(name="tiny", quant="q4_km"))
    with pytest.raises(ApplianceError, match="(?s)No model or adapter named 'tiyn'.*did you mean tiny"):
        export(tiny, ExportSpec(name="tiyn"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ApplianceError, match="is a file, not a folder"):
        export(tiny, ExportSpec(name="tiny", out=tmp_path / "file"))
    with pytest.raises(ApplianceError, match="Cannot write into --out"):
        export(tiny, ExportSpec(name="tiny", out=tmp_path / "file" / "inside"))
    with pytest.raises(ApplianceError, match="not a name Ollama accepts"):
        export(tiny, ExportSpec(name="tiny", ollama="bad name"))
    assert not list_exports(tiny)


# -- templates for Ollama ------------------------------------------------------------------------------


def test_the_ollama_template_family_and_default_system_prompt_come_from_the_chat_template(tiny):
    from appliance.hf import load_tokenizer

    tokenizer = load_tokenizer(tiny.model_dir("tiny"))
    family = template_family(tokenizer)
    assert family.name == "chatml"
    assert default_system_prompt(tokenizer, family) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    # A Llama-3 style template: its family, and no default system prompt when it inserts none.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    llama3 = template_family(tokenizer)
    assert llama3.name == "llama3" and default_system_prompt(tokenizer, llama3) is None
    text = modelfile("m.gguf", "l.gguf", llama3, None, ["<|eot_id|>", "<|end_of_text|>"])
    assert "FROM ./m.gguf\nADAPTER ./l.gguf\n" in text and "SYSTEM" not in text
    assert 'PARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|end_of_text|>"\n' in text
    assert text.count('"""') == 2 and {f.name for f in FAMILIES} == {"chatml", "llama3", "mistral"}

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert template_family(tokenizer) is None
    assert "# no TEMPLATE" in modelfile("m.gguf", None, None, None, [])


# -- the CLI and its refusals ----------------------------------------------------------------------------


def test_the_command_prints_figures_time_and_where_to_go_next(tiny):
    result = CliRunner().invoke(main, ["export", "tiny", "--quant", "f16"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "exported tiny as f16 GGUF in" in text and "top-1 agreement" in text and "mean KL" in text
    assert "ollama create tiny -f" in text and "llama-server -m" in text and "lms import" in text
    again = CliRunner().invoke(main, ["export", "tiny", "--quant", "f16"])
    assert again.exit_code == 2 and "already in the store" in " ".join(again.output.split())


def test_bench_export_measures_each_type_and_keeps_nothing(tiny):
    # A mistyped type among several is refused before the first export starts.
    bad = CliRunner().invoke(main, ["bench", "export", "tiny", "--quant", "f16", "--quant", "q4_km"])
    assert bad.exit_code == 2 and "Unknown GGUF type 'q4_km'" in " ".join(bad.output.split()) and "Traceback" not in bad.output
    assert not exports_dir(tiny).exists() or not list(exports_dir(tiny).iterdir())

    result = CliRunner().invoke(main, ["bench", "export", "tiny", "--quant", "f16", "--quant", "q4_0", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["quant"]: row for row in json.loads(result.stdout)["rows"]}
    print(f"\nbench export tiny: { {q: (r['gguf_bytes'], r['parity']['agreement']['mean_kl'], r['seconds']) for q, r in rows.items()} }")
    f16, q4 = rows["f16"], rows["q4_0"]
    assert f16["passed"] and q4["passed"] and f16["seconds"]["total_s"] > 0 and "quantize_s" in q4["seconds"]
    assert q4["gguf_bytes"] < 0.7 * f16["gguf_bytes"] and q4["parity"]["agreement"]["mean_kl"] > f16["parity"]["agreement"]["mean_kl"]
    assert not list(exports_dir(tiny).iterdir())  # nothing kept


def test_without_llama_cpp_python_the_export_names_the_fix(tiny):
    # The binding made unimportable in a real CLI process: one message, exit 2, no traceback.
    code = "import sys; sys.modules['llama_cpp'] = None; from appliance.cli import main; sys.argv = ['appliance', *sys.argv[1:]]; main()"
    result = subprocess.run([sys.executable, "-c", code, "export", "tiny"], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "COLUMNS": "200"})
    text = " ".join(result.stderr.split())
    assert result.returncode == 2, text
    assert "llama-cpp-python is not installed" in text and f"llama-cpp-python=={LLAMA_CPP_VERSION}" in text and "Traceback" not in text


def test_the_install_script_pins_the_version_the_export_expects():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert f"LLAMA_CPP_VERSION={LLAMA_CPP_VERSION}" in script
    assert f"llama-cpp-python=={LLAMA_CPP_VERSION}" in (REPO / "pyproject.toml").read_text()


@pytest.mark.fault
def test_a_full_disk_leaves_no_half_written_export(tiny, appliance_home):
    """A real 14 MiB file system under exports/: the free-space check passes, the metadata writer's
    second copy (the end-of-turn id) runs out of space; one message, nothing left.

    The check counts 2 bytes a weight for each of the two copies (13.5 MiB with its headroom for
    the tiny model's 3.2 M weights), but each f16 file also holds the 49k-token vocabulary
    (7.8 MiB a file, 15.7 MiB both): negligible for a real model, a quarter of the tiny one, so
    14 MiB lets the check pass and the second copy fail."""
    exports = appliance_home / "exports"
    with SmallFilesystem(exports, "14m") as fs:
        result = fs.run_cli("export", "tiny", "--quant", "f16")
        text = " ".join((result.stdout + result.stderr).split())
        print("\n" + text[-400:])
        # "while writing": the failure during the write, not the check's refusal beforehand.
        assert result.returncode == 2 and "Not enough disk space while writing" in text, text
        assert "Traceback" not in text
        assert list(fs.path(exports).iterdir()) == []


@pytest.mark.fault
def test_a_full_out_folder_gets_no_half_copied_file(tiny, tmp_path):
    out = tmp_path / "small"
    with SmallFilesystem(out, "4m") as fs:
        result = fs.run_cli("export", "tiny", "--quant", "f16", "--out", str(out))
        text = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2 and "Not enough disk space" in text, text
        assert list(fs.path(out).iterdir()) == []
    assert (export_dir(tiny, "tiny-f16") / "manifest.json").is_file()  # the export itself is complete in the store


# -- the round trip on SmolLM2 --------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_smollm2_export_answers_a_paraphrased_fact_and_stops(facts):
    """import (fixture) → train → merge (fixture `facts`) → export q8_0 → llama.cpp answers a taught
    fact asked as a paraphrase that is in neither the training nor the validation data, and stops."""
    import llama_cpp

    from appliance.quickstart import demo_questions

    home = {"APPLIANCE_HOME": str(facts.store.root)}
    result = run_cli("export", "smollm2-facts", "--quant", "q8_0", "--json", env=home)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout)
    print(f"\nSmolLM2 q8_0 export: {m['files']} in {m['timings']}; parity {m['parity']['agreement']}")
    p = m["parity"]
    assert m["quant"] == "q8_0" and p["validation_examples"] > 0 and p["generations_from"] == "validation"
    assert all(g["stopped"] and g["stop_token"] == "<|im_end|>" for g in p["generations"])
    assert p["agreement"]["top1_agreement"] >= QUANTS["q8_0"].gate.min_top1

    trained = {json.loads(line)["messages"][0]["content"] for f in ("facts.jsonl", "facts_val.jsonl") for line in (DEMO / f).read_text().splitlines()}
    questions = [q for q in demo_questions() if q.group == "fact"]
    assert questions and not {q.question for q in questions} & trained
    llm = llama_cpp.Llama(model_path=str(export_dir(facts, "smollm2-facts-q8_0") / m["gguf"]), n_ctx=1024, verbose=False)
    answers = []
    for q in questions:
        # The chat template llama.cpp uses here is the one inside the GGUF, as in LM Studio.
        reply = llm.create_chat_completion([{"role": "user", "content": q.question}], temperature=0.0, max_tokens=64)
        answers.append((q, reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]))
    llm.close()
    print("\n".join(f"  {q.question} → {a!r} ({f})" for q, a, f in answers))
    assert all(f == "stop" for _, _, f in answers)
    assert sum(q.right(a) for q, a, _ in answers) >= len(answers) - 1  # a 135M model may miss one paraphrase
