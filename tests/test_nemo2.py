"""NeMo 2 in and out, against the real NeMo (nemo_toolkit 2.7.3 in the venv scripts/test.sh makes):
NeMo's own `llm.import_ckpt` turns a Hugging Face Llama into a NeMo 2 checkpoint, and
`minitron import nemo_path=` of it (at TP=1 and TP=2) holds the HF weights and gives the HF logits;
a pruned student written by `minitron export-nemo` (at TP=2, in NeMo's environment) is restored by
NeMo's own `llm.export_ckpt`, whose Hugging Face model gives the logits of our `export-hf` of the
same student, and re-imports bit-exactly. A hybrid (Nemotron-H) written by `export-nemo` is NeMo's
own MambaModel: NeMo restores it to transformers' NemotronH logits and saves it again, and both the
export and NeMo's save re-import bit-exactly. What cannot be read is refused in one line; NeMo
missing is said in one line. NeMo's side runs in tests/nemo_driver.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from commands import ENV, last_json, minitron
from distributed import run_distributed
from nemo_minitron import checkpoint, convert
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge, nemo2
from nemo_minitron.models.hf_io import write_hf_directory
from tiny import (hf_model, short_correction, tiny_arch, tiny_moe_arch, tiny_tokenizer, user_corpus, write_hf_dir,
                  write_sentence_docs)

DRIVER = Path(__file__).parent / "nemo_driver.py"
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def nemo(python: Path, command: str, source: Path, output: Path, *more: Path) -> None:
    """tests/nemo_driver.py COMMAND SOURCE OUTPUT [SOURCE OUTPUT ...] in NeMo's environment."""
    proc = subprocess.run([str(python), str(DRIVER), command, str(source), str(output), *map(str, more)],
                          cwd=output.parent, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, f"NeMo {command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def hf_logits(hf_dir: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, compat_python) -> dict:
    """tiny_arch(tie=False) with perturbed norms as a Hugging Face directory (written portably, so
    transformers 4.57 in NeMo's venv reads it), and NeMo's llm.import_ckpt of it."""
    root = tmp_path_factory.mktemp("nemo2")
    arch = tiny_arch(tie=False)
    model = hf_model(arch)
    write_hf_directory(arch, model.state_dict(), tiny_tokenizer(arch.vocab_size), root / "hf")
    nemo(compat_python, "import-hf", root / "hf", root / "nemo")
    return {"root": root, "arch": arch, "hf": root / "hf", "nemo": root / "nemo",
            "global_sd": bridge.hf_to_global(arch, model.state_dict())}


@pytest.fixture(scope="module")
def imported(teacher) -> tuple[Path, dict]:
    """`minitron import nemo_path=` of NeMo's checkpoint at TP=2, and its result."""
    out = teacher["root"] / "imported"
    result = last_json(minitron("import", f"nemo_path={teacher['nemo']}", f"output_dir={out}", "tp=2", nproc=2))
    return out, result


def weights_and_logits(path: Path, tokens: torch.Tensor = TOKENS):
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    model = checkpoint.load_checkpoint(path)
    [logits] = forward_microbatches(model, [{"tokens": tokens}], lambda out, _: gather_vocab_parallel(out))
    return bridge.gather_global(model), logits


def test_import_of_nemos_checkpoint_equals_the_hf_model(teacher, imported, tmp_path):
    at_tp1 = last_json(minitron("import", f"nemo_path={teacher['nemo']}", f"output_dir={tmp_path / 'tp1'}"))
    for out, result in ((tmp_path / "tp1", at_tp1), imported):
        assert result["total"] == teacher["arch"].num_parameters()["total"]
        assert checkpoint.read_arch(out).differences(teacher["arch"]) == []
        [(weights, logits)] = run_distributed(weights_and_logits, world_size=1, args=(out,))
        assert weights.keys() == teacher["global_sd"].keys()
        for name, tensor in teacher["global_sd"].items():  # NeMo copies fp32 weights as they are
            assert torch.equal(weights[name], tensor), name
        torch.testing.assert_close(logits, hf_logits(teacher["hf"]), rtol=0, atol=1e-5)


def test_prune_export_nemo_then_nemos_export_equals_export_hf(teacher, imported, compat_python, tmp_path):
    calib = write_sentence_docs(tmp_path / "calib.jsonl", 16)
    pruned, exported, ours, theirs, back = (tmp_path / n for n in ("pruned", "nemo", "ours-hf", "nemo-hf", "back"))
    minitron("prune", f"checkpoint={imported[0]}", f"output_dir={pruned}", f"calib.data={calib}", "calib.num_samples=16",
             "calib.seq_len=16", "calib.micro_batch_size=2", "loss_samples=4", "target.num_layers=2",
             "target.hidden_size=48", "target.ffn_hidden_size=64", "target.num_attention_heads=2")
    arch = checkpoint.read_arch(pruned)
    result = last_json(minitron("export-nemo", f"checkpoint={pruned}", f"output_dir={exported}", "tp=2", nproc=2,
                                python=str(compat_python)))
    assert result["nemo_toolkit"] == "2.7.3"

    # context/ describes the pruned model, as NeMo's model.yaml writes it
    config = yaml.safe_load((exported / "context" / "model.yaml").read_text())["config"]
    assert (config["num_layers"], config["hidden_size"], config["ffn_hidden_size"], config["num_attention_heads"],
            config["num_query_groups"], config["kv_channels"]) == (2, 48, 64, 2, arch.num_query_groups, 24)

    # NeMo restores it and converts it to HF with its own exporter: our export-hf's model
    nemo(compat_python, "export-hf", exported, theirs)
    minitron("export-hf", f"checkpoint={pruned}", f"output_dir={ours}")
    torch.testing.assert_close(hf_logits(theirs), hf_logits(ours), rtol=0, atol=1e-5)

    # and it reads back (saved at TP=2, read at TP=1) to the pruned weights bit for bit
    minitron("import", f"nemo_path={exported}", f"output_dir={back}")
    assert checkpoint.read_arch(back).differences(arch) == []
    [(expected, _)] = run_distributed(weights_and_logits, world_size=1, args=(pruned,))
    [(weights, _)] = run_distributed(weights_and_logits, world_size=1, args=(back,))
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


# NeMo's Qwen importers take the head dimension and (Qwen3-MoE) the experts from their config
# classes, not from config.json: hidden / heads for Qwen2, Qwen3's 128, and Qwen3-30B-A3B's 128
# experts with top-8, as every published Qwen has; the tiny models have them too. Mixtral's importer
# pads the vocabulary to a multiple of 128 (320 -> 384 rows).
FAMILIES = {
    "qwen2": tiny_arch(tie=False, family="qwen2", kv_channels=16),
    "qwen3_moe": tiny_moe_arch("qwen3_moe", num_layers=2, kv_channels=128, num_moe_experts=128, moe_router_topk=8,
                               moe_ffn_hidden_size=16),
    "mixtral": tiny_moe_arch("mixtral"),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory, compat_python) -> dict:
    """Per family in FAMILIES: the HF model, its directory, NeMo's llm.import_ckpt of it and
    `minitron import nemo_path=` of that."""
    root = tmp_path_factory.mktemp("families")
    found = {}
    for family, arch in FAMILIES.items():
        global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
        # the published files' layout (one module per expert), which transformers 4.57 under NeMo reads
        write_hf_directory(arch, bridge.global_to_hf(arch, global_sd), tiny_tokenizer(arch.vocab_size),
                           root / f"{family}-hf")
        found[family] = {"arch": arch, "hf": root / f"{family}-hf", "nemo": root / f"{family}-nemo",
                         "ours": root / f"{family}-ours", "global_sd": global_sd}
    nemo(compat_python, "import-hf", *[p for f in found.values() for p in (f["hf"], f["nemo"])])
    for f in found.values():
        f["result"] = last_json(minitron("import", f"nemo_path={f['nemo']}", f"output_dir={f['ours']}"))
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_import_of_nemos_qwen_and_moe_checkpoints_equals_the_hf_model(families, family):
    """Qwen2's QKV biases, Qwen3-MoE's query/key norms, 128 experts and router, Mixtral's experts,
    as NeMo's own importers wrote them, read back to the HF weights and logits."""
    f = families[family]
    arch = checkpoint.read_arch(f["ours"])
    vocab = f["arch"].vocab_size
    # NeMo's Qwen3 importer also leaves seq_length, the positions NeMo builds, at its class's 4096
    assert arch.max_position_embeddings == (4096 if family == "qwen3_moe" else f["arch"].max_position_embeddings)
    assert arch.differences(f["arch"].replace(vocab_size=arch.vocab_size,
                                              max_position_embeddings=arch.max_position_embeddings)) == []
    [(weights, logits)] = run_distributed(weights_and_logits, world_size=1, args=(f["ours"],))
    assert weights.keys() == f["global_sd"].keys()
    for name, tensor in f["global_sd"].items():  # the HF rows; padding rows follow
        assert torch.equal(weights[name][: tensor.shape[0]], tensor), name
    torch.testing.assert_close(logits[..., :vocab], hf_logits(f["hf"]), rtol=0, atol=1e-5)


def test_export_nemo_of_qwen_and_moe_is_restored_by_nemo(families, compat_python, tmp_path):
    """`minitron export-nemo` writes NeMo's own model classes (Qwen2Model, Qwen3Model with the MoE
    config, MixtralModel) and TE-spec keys; NeMo's llm.export_ckpt restores each and its HF model
    gives the original logits. Qwen2-MoE, which NeMo 2 has no class for, is refused."""
    pairs = []
    for family, f in families.items():
        result = last_json(minitron("export-nemo", f"checkpoint={f['ours']}", f"output_dir={tmp_path / family}",
                                    python=str(compat_python)))
        assert result["nemo_toolkit"] == "2.7.3"
        pairs += [tmp_path / family, tmp_path / f"{family}-hf"]
    model_yaml = yaml.safe_load((tmp_path / "qwen3_moe" / "context" / "model.yaml").read_text())
    assert model_yaml["_target_"].endswith("qwen3.Qwen3Model")
    assert model_yaml["config"]["_target_"].endswith("qwen3.Qwen3MoEConfig")
    assert (model_yaml["config"]["num_moe_experts"], model_yaml["config"]["moe_router_topk"]) == (128, 8)
    nemo(compat_python, "export-hf", *pairs)
    for family, f in families.items():
        vocab = f["arch"].vocab_size
        torch.testing.assert_close(hf_logits(tmp_path / f"{family}-hf")[..., :vocab], hf_logits(f["hf"]),
                                   rtol=0, atol=1e-5, msg=lambda m, family=family: f"{family}: {m}")
    qwen2_moe = tiny_moe_arch("qwen2_moe")
    with pytest.raises(UserError, match="NeMo 2 has no qwen2_moe model class"):
        convert._check_nemo_exportable(qwen2_moe)


def test_export_nemo_without_nemo_says_so_in_one_line(imported, tmp_path):
    proc = minitron("export-nemo", f"checkpoint={imported[0]}", f"output_dir={tmp_path / 'x'}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "NeMo 2 is not importable here" in errors[0]
    assert not (tmp_path / "x" / "context").exists()


def edited(source: Path, tmp_path: Path, **config) -> Path:
    """A copy of the NeMo 2 checkpoint `source` whose model.yaml config has `config` set."""
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    file = copy / "context" / "model.yaml"
    model = yaml.safe_load(file.read_text())
    model["config"].update(config)
    file.write_text(yaml.safe_dump(model))
    return copy


@pytest.mark.parametrize("config, message", [
    ({"num_moe_experts": 8, "moe_router_score_function": "sigmoid"},
     r"unsupported NeMo 2 model: moe_router_score_function='sigmoid' \(supported: 'softmax'\)"),
    ({"add_qkv_bias": True, "qk_layernorm": True}, r"RMSNorm \+ swiglu layers with add_qkv_bias=True, qk_layernorm=True, "
                                                   r"which no Hugging Face family has"),
    ({"add_qkv_bias": True}, r"imply decoder.layers.self_attention.linear_qkv.bias of shape \(4, \d+\), but the "
                             r"checkpoint lacks it"),
    ({"window_size": [64, 0]}, r"sliding-window attention \(window_size=\[64, 0\] is shorter than seq_length=256\)"),
    ({"position_embedding_type": "learned_absolute"}, r"position_embedding_type=learned_absolute \(rotary only\)"),
    ({"is_hybrid_model": True}, r"a hybrid \(Mamba\) model \(is_hybrid_model=True\)"),  # in a GPT model's config
    ({"hidden_size": 32}, r"context/model.yaml: its model config fields imply embedding.word_embeddings.weight of "
                          r"shape \(320, 32\), but the checkpoint holds \(320, 64\)"),
])
def test_what_cannot_be_read_is_refused_naming_it(teacher, tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        nemo2.read_checkpoint(edited(teacher["nemo"], tmp_path, **config))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, compat_python) -> dict:
    """The tiny NemotronH (untied) imported from its Hugging Face directory, its `export-nemo` at
    TP=2 in NeMo's environment, and NeMo's restore of that export (tests/nemo_driver.py `restore`:
    the restored model's logits and NeMo's own save of it)."""
    root = tmp_path_factory.mktemp("hybrid")
    arch = tiny_arch(tie=False, family="nemotron_h")
    model = write_hf_dir(root / "hf", arch)
    minitron("import", f"hf_path={root / 'hf'}", f"output_dir={root / 'ours'}")
    result = last_json(minitron("export-nemo", f"checkpoint={root / 'ours'}", f"output_dir={root / 'nemo'}", "tp=2",
                                nproc=2, python=str(compat_python)))
    nemo(compat_python, "restore", root / "nemo", root / "restored")
    return {"arch": arch, "hf": root / "hf", "ours": root / "ours", "nemo": root / "nemo",
            "restored": root / "restored", "result": result, "global_sd": bridge.hf_to_global(arch, model.state_dict())}


def test_export_nemo_of_a_hybrid_is_restored_by_nemo_to_the_same_logits(hybrid):
    """export-nemo writes NeMo's MambaModel with the NemotronH config base and the model's pattern
    and Mamba sizes; NeMo restores it (its context, model and weights loaded by NeMo's own code) to a
    model computing transformers' NemotronH logits and ours."""
    assert hybrid["result"]["nemo_toolkit"] == "2.7.3"
    model_yaml = yaml.safe_load((hybrid["nemo"] / "context" / "model.yaml").read_text())
    config = model_yaml["config"]
    assert model_yaml["_target_"].endswith("ssm.MambaModel") and config["_target_"].endswith("ssm.NemotronHConfigBase")
    assert (config["hybrid_override_pattern"], config["mamba_num_heads"], config["mamba_head_dim"],
            config["mamba_num_groups"], config["mamba_state_dim"]) == ("M*-M", 8, 12, 2, 16)
    restored = torch.load(hybrid["restored"] / "logits.pt")
    torch.testing.assert_close(restored["logits"], hf_logits(hybrid["hf"], restored["tokens"]), rtol=0, atol=1e-5)
    [(_, ours)] = run_distributed(weights_and_logits, world_size=1, args=(hybrid["ours"], restored["tokens"]))
    torch.testing.assert_close(restored["logits"], ours, rtol=0, atol=1e-5)


def test_a_hybrid_reads_back_from_the_export_and_from_nemos_save_bit_exactly(hybrid, tmp_path):
    """`minitron import nemo_path=` of the export (saved at TP=2) and of NeMo's own save of the model
    it restored gives the Hugging Face weights bit for bit."""
    for source, out in ((hybrid["nemo"], tmp_path / "export"), (hybrid["restored"] / "nemo", tmp_path / "nemos")):
        minitron("import", f"nemo_path={source}", f"output_dir={out}")
        assert checkpoint.read_arch(out).differences(hybrid["arch"]) == []
        [(weights, _)] = run_distributed(weights_and_logits, world_size=1, args=(out,))
        assert weights.keys() == hybrid["global_sd"].keys()
        for name, tensor in hybrid["global_sd"].items():
            assert torch.equal(weights[name], tensor), f"{source}: {name}"


@pytest.mark.parametrize("config, message", [
    ({"hybrid_override_pattern": "M*-E"}, r"hybrid layers \['E'\] in hybrid_override_pattern=M\*-E"),
    ({"position_embedding_type": "rope"}, r"position_embedding_type=rope in a hybrid model \(Nemotron-H's attention"),
    ({"gated_linear_unit": True}, r"gated_linear_unit=True in a hybrid model \(Nemotron-H's layers are RMSNorm"),
    ({"hybrid_override_pattern": "M*-"}, r"megatron builds no 4-layer hybrid from .*: The hybrid override pattern is "
                                         r"the wrong length"),
])
def test_what_cannot_be_read_of_a_hybrid_is_refused_naming_it(hybrid, tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        nemo2.read_checkpoint(edited(hybrid["nemo"], tmp_path, **config))


def test_export_nemo_refuses_a_tied_hybrid():
    with pytest.raises(UserError, match=r"export-nemo: NeMo 2's MambaModel always builds an output layer of its own"):
        convert._check_nemo_exportable(tiny_arch(tie=True, family="nemotron_h"))


def test_wrong_paths_and_tokenizers_are_refused(teacher, tmp_path):
    with pytest.raises(UserError, match=r"has no context/model.yaml: .*; checkpoints below it: .*nemo"):
        nemo2.read_checkpoint(teacher["root"])
    archive = tmp_path / "model.nemo"
    archive.write_bytes(b"")
    with pytest.raises(UserError, match="is a .nemo archive"):
        nemo2.read_checkpoint(archive)
    tiny_tokenizer(330).save_pretrained(str(tmp_path / "long"))
    with pytest.raises(UserError, match="has 330 tokens, but the checkpoint's 320 embedding rows are a vocabulary of "
                                        "257 to 320 tokens padded to a multiple of 64"):
        nemo2.read_checkpoint(teacher["nemo"], str(tmp_path / "long"))
    sentencepiece = edited(teacher["nemo"], tmp_path)
    model = yaml.safe_load((sentencepiece / "context" / "model.yaml").read_text())
    model["tokenizer"] = {"_target_": "nemo.collections.common.tokenizers.SentencePieceTokenizer",
                          "model_path": "/data/tokenizer.model"}
    (sentencepiece / "context" / "model.yaml").write_text(yaml.safe_dump(model))
    with pytest.raises(UserError, match=r"set tokenizer=DIR .*SentencePieceTokenizer \(/data/tokenizer.model\)"):
        nemo2.read_checkpoint(sentencepiece)


def save_with_local_norm_names(path: Path, arch, global_sd: dict) -> None:
    """A NeMo-style save (`module.` prefix) whose per-layer norms go by the local spec's names."""
    import dataclasses

    from megatron.core import dist_checkpointing

    from nemo_minitron.models.gpt import build_gpt_model

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    sharded = {}
    for name, item in model.sharded_state_dict(prefix=nemo2.PREFIX).items():
        local = [alias for alias in bridge.fused_norm_aliases(item.key) if "layernorm." in alias]
        sharded[name] = dataclasses.replace(item, key=local[0]) if local else item
    dist_checkpointing.save(sharded, str(path))


def read_local_names(path: Path, arch) -> dict:
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.saved_weights import load_model_weights, saved_shapes

    assert "module.decoder.layers.input_layernorm.weight" in saved_shapes(path)
    model = build_gpt_model(arch)
    load_model_weights(model, path, prefix=nemo2.PREFIX)
    return bridge.gather_global(model)


def test_norms_under_local_names_are_read_too(teacher, tmp_path):
    (tmp_path / "weights").mkdir()
    run_distributed(save_with_local_norm_names, world_size=1,
                    args=(tmp_path / "weights", teacher["arch"], teacher["global_sd"]))
    [weights] = run_distributed(read_local_names, world_size=1, args=(tmp_path / "weights", teacher["arch"]))
    for name, tensor in teacher["global_sd"].items():
        assert torch.equal(weights[name], tensor), name


def norms_of_ones_warn(arch) -> list[str]:
    import logging

    from nemo_minitron.models.gpt import build_gpt_model

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("nemo_minitron").addHandler(handler)
    model = build_gpt_model(arch)  # megatron initialises every norm weight to 1.0
    nemo2._check_norms(Path("CKPT"), model)
    return records


def test_a_checkpoint_whose_norms_are_all_ones_is_warned_about():
    [records] = run_distributed(norms_of_ones_warn, world_size=1, args=(tiny_arch(),))
    assert len(records) == 1 and "every per-layer norm weight in CKPT is exactly 1.0" in records[0]


def test_pipeline_from_nemo_to_nemo_and_megatron_lm_beside_nemo(teacher, compat_python, tmp_path):
    """The main job in NeMo's environment (megatron-core 0.15.3, transformers 4.57, NeMo 2.7.3):
    NeMo's checkpoint in, the student out as Hugging Face, Megatron-LM and NeMo 2."""
    work = tmp_path / "run"
    summary = last_json(minitron(
        "pipeline", f"work_dir={work}", f"teacher.nemo_path={teacher['nemo']}",
        *user_corpus(tmp_path / "docs.jsonl", 60),
        "prune.target={ffn_hidden_size: 64, num_layers: 2}", "prune.calib.num_samples=4", "prune.calib.seq_len=32",
        "prune.loss_samples=2", "distill.train.steps=2", "distill.train.seq_length=32", "distill.optim.warmup_steps=1",
        "distill.train.save_interval=0", "eval.seq_len=32", "eval.max_tokens=256", "export.megatron=true",
        "export.nemo=true", *short_correction(32), python=str(compat_python)))
    assert [s for s in summary["stage_seconds"] if s.startswith("export")] == ["export_hf", "export_megatron",
                                                                               "export_nemo"]
    student = checkpoint.read_arch(work / "distill" / "final")
    config = yaml.safe_load((Path(summary["student"]["nemo_dir"]) / "context" / "model.yaml").read_text())["config"]
    assert (config["num_layers"], config["ffn_hidden_size"]) == (student.num_layers, student.ffn_hidden_size) == (2, 64)
    assert (Path(summary["student"]["megatron_dir"]) / "megatron_args.txt").is_file()


def test_pipeline_ending_in_nemo_checks_for_nemo_first(tmp_path):
    proc = minitron("pipeline", f"work_dir={tmp_path / 'run'}", "export.nemo=true", check=False)
    assert proc.returncode == 2 and "NeMo 2 is not importable here" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
