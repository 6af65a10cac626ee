"""Post-prune reconstruction (pruning/reconstruct.py) against an independent solve: transformers'
own model gives the activations, numpy's least squares the refit weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import run_distributed
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge
from nemo_minitron.pruning import PruneIndices, PruneSpec, prune_global
from nemo_minitron.pruning.reconstruct import Reconstruction, Statistics, bytes_per_layer, kept_columns, refit
from tiny import hf_model, tiny_arch, tiny_moe_arch

WINDOWS = torch.randint(0, 320, (16, 33), generator=torch.Generator().manual_seed(2))
RIDGE = 1e-2
SPEC = PruneSpec(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2)


def _indices(teacher, target) -> PruneIndices:
    """Fixed, arbitrary kept sets (layers 1 and 3 dropped, one head of each group kept)."""
    g = torch.Generator().manual_seed(5)
    layers = [0, 2]
    return PruneIndices(
        hidden=torch.randperm(teacher.hidden_size, generator=g)[:target.hidden_size].sort().values,
        layers=layers,
        heads={i: torch.tensor([[i % 2], [2 + (i + 1) % 2]]) for i in layers},
        neurons={i: torch.randperm(teacher.ffn_hidden_size, generator=g)[:target.ffn_hidden_size].sort().values
                 for i in layers},
    )


def _teacher():
    teacher = tiny_arch(tie=False)
    hf = hf_model(teacher)
    target = SPEC.target_arch(teacher, tp=2, pp=1)
    return teacher, hf, bridge.hf_to_global(teacher, hf.state_dict()), target, _indices(teacher, target)


def _recorded(teacher, sd, indices, ridge=RIDGE, depth=False, use_te=False):
    """Megatron at this rank's layout: the teacher model and its statistics recorded on WINDOWS."""
    from nemo_minitron.importance import activation_loop
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning.reconstruct import record_statistics

    model = build_gpt_model(teacher, use_te=use_te)
    bridge.load_global(model, sd)
    return model, record_statistics(model, indices, activation_loop(WINDOWS, 4, progress=False), ridge, bridge=depth)


def pruned_with_reconstruction(teacher, sd, target, indices, ridge=RIDGE, depth=False, use_te=False):
    """Megatron: record the statistics on WINDOWS at this rank's layout, prune, gather."""
    from nemo_minitron.pruning import prune_model

    model, reconstruction = _recorded(teacher, sd, indices, ridge, depth, use_te)
    pruned = prune_model(model, target, indices, reconstruction=reconstruction)
    return bridge.gather_global(pruned), reconstruction.errors


def _hf_activations(hf) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, consumer): (inputs [tokens, width], outputs [tokens, h])} of down_proj and o_proj."""
    captured, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        def layer_hook(module, args, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            captured[i, "residual"] = out.reshape(-1, out.shape[-1]).double().numpy()
        handles.append(layer.register_forward_hook(layer_hook))
        for consumer, module in (("mlp", layer.mlp.down_proj), ("attention", layer.self_attn.o_proj)):
            def hook(module, args, output, key=(i, consumer)):
                captured[key] = (args[0].reshape(-1, args[0].shape[-1]).double().numpy(),
                                 output.reshape(-1, output.shape[-1]).double().numpy())
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        hf(WINDOWS[:, :-1])
    for handle in handles:
        handle.remove()
    return captured


def _numpy_refit(a_kept: np.ndarray, y: np.ndarray, w_kept: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_V |Y - A_K V^T|^2 + lam |V - W_K|^2 as one stacked least-squares problem."""
    lam = ridge * np.mean(np.sum(a_kept * a_kept, axis=0))
    k = a_kept.shape[1]
    design = np.vstack([a_kept, np.sqrt(lam) * np.eye(k)])
    target = np.vstack([y, np.sqrt(lam) * w_kept.T])
    return np.linalg.lstsq(design, target, rcond=None)[0].T


def _relative_error(a_kept, y, w) -> float:
    return float(np.sum((y - a_kept @ w.T) ** 2) / np.sum(y ** 2))


@pytest.fixture(scope="module")
def reference():
    teacher, hf, sd, target, indices = _teacher()
    [(pruned, errors)] = run_distributed(pruned_with_reconstruction, world_size=1, args=(teacher, sd, target, indices))
    return teacher, hf, sd, target, indices, pruned, errors


def test_refit_equals_numpy_least_squares_on_transformers_activations(reference):
    teacher, hf, sd, target, indices, pruned, errors = reference
    activations = _hf_activations(hf)
    names = {"mlp": ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
             "attention": ("self_attention.linear_proj.weight", "self_attn.o_proj.weight")}
    plain = prune_global(sd, teacher, target, indices)
    for new, old in enumerate(indices.layers):
        for consumer, (megatron_name, hf_name) in names.items():
            a, y = activations[old, consumer]
            columns = kept_columns(indices, old, consumer, teacher).numpy()
            w_kept = hf.state_dict()[f"model.layers.{old}.{hf_name}"].double().numpy()[:, columns]
            expected = _numpy_refit(a[:, columns], y, w_kept, RIDGE)
            got = pruned[f"decoder.layers.{new}.{megatron_name}"]
            np.testing.assert_allclose(got.double().numpy(), expected[indices.hidden.numpy()], rtol=2e-4, atol=2e-6)
            assert not torch.equal(got, plain[f"decoder.layers.{new}.{megatron_name}"])
            # the reported calibration errors are the numpy ones, and the refit never raises them
            record = errors[consumer]
            at = record["layers"].index(old)
            before, after = _relative_error(a[:, columns], y, w_kept), _relative_error(a[:, columns], y, expected)
            assert record["before"][at] == pytest.approx(before, rel=1e-4, abs=1e-6)
            assert record["after"][at] == pytest.approx(after, rel=1e-4, abs=1e-6)
            assert after < before
    # everything but the consumers' kept columns is the plain prune's, bit for bit
    refit_names = {f"decoder.layers.{n}.{name}" for n in range(len(indices.layers)) for name, _ in names.values()}
    for name, tensor in plain.items():
        if name not in refit_names:
            assert torch.equal(pruned[name], tensor), name


def test_depth_bridge_refits_the_mlp_before_each_dropped_block():
    """reconstruct_depth: the MLP of the kept layer before a dropped run reproduces its own output
    plus what the run added to the residual stream (numpy on transformers' hidden states)."""
    teacher, hf, sd, target, indices = _teacher()
    [(pruned, errors)] = run_distributed(pruned_with_reconstruction, world_size=1,
                                         args=(teacher, sd, target, indices, RIDGE, True))
    activations = _hf_activations(hf)
    for new, (old, end) in enumerate([(0, 1), (2, 3)]):  # layers 1 and 3 are dropped
        a, y = activations[old, "mlp"]
        target_y = y + activations[end, "residual"] - activations[old, "residual"]
        columns = indices.neurons[old].numpy()
        w_kept = hf.state_dict()[f"model.layers.{old}.mlp.down_proj.weight"].double().numpy()[:, columns]
        expected = _numpy_refit(a[:, columns], target_y, w_kept, RIDGE)
        np.testing.assert_allclose(pruned[f"decoder.layers.{new}.mlp.linear_fc2.weight"].double().numpy(),
                                   expected[indices.hidden.numpy()], rtol=2e-4, atol=2e-6)
        assert errors["mlp"]["after"][new] < errors["mlp"]["before"][new]


def test_check_bridges_leaves_a_bridge_out_only_where_that_lowers_the_loss():
    """The greedy policy on a table of losses per set of kept bridges: each bridge in layer order is
    left out once and stays out if the loss falls; the winner is what stays loaded."""
    from nemo_minitron.pruning.surgery import check_bridges

    def run(table: dict[frozenset, float]) -> tuple[list[dict], frozenset, int]:
        state = {"kept": frozenset({0, 2}), "loads": 0}

        def load(kept):
            state["kept"], state["loads"] = frozenset(kept), state["loads"] + 1

        return check_bridges({0: 1, 2: 3}, load, lambda: table[state["kept"]]), state["kept"], state["loads"]

    both, first, second, neither = frozenset({0, 2}), frozenset({0}), frozenset({2}), frozenset()
    checks, kept, loads = run({both: 3.0, second: 2.5, neither: 2.7, first: 9.0})
    assert [(c["layer"], c["dropped"], c["loss_with"], c["loss_without"], c["kept"]) for c in checks] == [
        (0, [1, 1], 3.0, 2.5, False), (2, [3, 3], 2.5, 2.7, True)]
    assert kept == second and loads == 3  # two trials, then the winner again
    checks, kept, loads = run({both: 3.0, second: 3.0, neither: 2.9, first: 2.0})
    assert [c["kept"] for c in checks] == [True, False]  # a tie keeps the bridge
    assert kept == first and loads == 2  # the last trial is the winner: not loaded twice


def guarded_prune(teacher, sd, target, indices):
    """The prune with each depth bridge checked on the LM loss over WINDOWS: weights, loss, checks."""
    from nemo_minitron.importance import loss_metric
    from nemo_minitron.pruning import prune_model

    model, recorded = _recorded(teacher, sd, indices, depth=True)
    pruned = prune_model(model, target, indices, reconstruction=recorded, bridge_loss=loss_metric(WINDOWS, 4))
    return bridge.gather_global(pruned), loss_metric(WINDOWS, 4)(pruned), recorded.bridge_checks


def every_bridge_set(teacher, sd, target, indices):
    """Independently of the check: the prune with every set of bridges (a reconstruction holding
    that set's statistics and no bridge to check) and its loss; and the refit recorded without bridges."""
    from nemo_minitron.importance import loss_metric
    from nemo_minitron.pruning import prune_model

    model, recorded = _recorded(teacher, sd, indices, depth=True)
    sets = {}
    for kept in (frozenset(), frozenset({0}), frozenset({2}), frozenset({0, 2})):
        pruned = prune_model(model, target, indices, reconstruction=Reconstruction(recorded.with_bridges(kept), RIDGE))
        sets[kept] = (bridge.gather_global(pruned), loss_metric(WINDOWS, 4)(pruned))
    model, unbridged = _recorded(teacher, sd, indices)
    return sets, bridge.gather_global(prune_model(model, target, indices, reconstruction=unbridged))


@pytest.fixture(scope="module")
def guarded():
    teacher, _, sd, target, indices = _teacher()
    [result] = run_distributed(guarded_prune, world_size=1, args=(teacher, sd, target, indices))
    return (teacher, sd, target, indices), result


def test_the_bridge_check_keeps_the_bridge_set_of_lowest_loss_it_tried(guarded):
    """Each check's losses are those of the independently pruned bridge sets; the prune ends on
    the set of lowest loss among those tried, weights bit for bit; without its bridge an MLP is
    refit exactly as by a reconstruction recorded without bridges."""
    args, (weights, loss, checks) = guarded
    [(sets, plain_refit)] = run_distributed(every_bridge_set, world_size=1, args=args)
    kept = frozenset({0, 2})
    for check, layer, last in zip(checks, (0, 2), (1, 3), strict=True):
        assert (check["layer"], check["dropped"]) == (layer, [layer + 1, last])
        assert check["loss_with"] == sets[kept][1] and check["loss_without"] == sets[kept - {layer}][1]
        if not check["kept"]:
            kept = kept - {layer}
    assert loss == sets[kept][1] == min([checks[0]["loss_with"]] + [c["loss_without"] for c in checks])
    assert all(torch.equal(weights[name], sets[kept][0][name]) for name in weights)
    assert all(torch.equal(plain_refit[name], sets[frozenset()][0][name]) for name in plain_refit)
    fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
    assert not torch.equal(sets[frozenset({0})][0][fc2], sets[frozenset()][0][fc2])


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2)])
def test_the_bridge_check_at_tp_and_pp_equals_tp1(guarded, tp, pp, world):
    args, (ref_weights, ref_loss, ref_checks) = guarded
    for weights, loss, checks in run_distributed(guarded_prune, world, tp, pp, args):
        assert [c["kept"] for c in checks] == [c["kept"] for c in ref_checks]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, tensor in ref_weights.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=5e-6, msg=name)


@pytest.mark.slow
def test_a_bridge_split_over_pipeline_stages_is_left_out():
    """At pp=2, layers 1..2 dropped after layer 0 end on the other stage: layer 0 is refit without
    the bridge, the same on every rank, and as at pp=1 without depth reconstruction."""
    teacher, _, sd, target, _ = _teacher()
    indices = _indices(teacher, target)
    indices.layers = [0, 3]
    indices.heads = {i: indices.heads[0] for i in (0, 3)}
    indices.neurons = {i: indices.neurons[0] for i in (0, 3)}
    [(plain, _)] = run_distributed(pruned_with_reconstruction, world_size=1, args=(teacher, sd, target, indices))
    for pruned, _ in run_distributed(pruned_with_reconstruction, 2, 1, 2, (teacher, sd, target, indices, RIDGE, True)):
        for name, tensor in plain.items():
            torch.testing.assert_close(pruned[name], tensor, rtol=1e-4, atol=5e-6, msg=name)


def test_without_reconstruction_the_prune_is_the_plain_surgery():
    """reconstruct=false runs today's surgery: the weights equal prune_global's bit for bit."""
    teacher, _, sd, target, indices = _teacher()

    def plain(teacher, sd, target, indices):
        from nemo_minitron.models.gpt import build_gpt_model
        from nemo_minitron.pruning import prune_model

        model = build_gpt_model(teacher)
        bridge.load_global(model, sd)
        return bridge.gather_global(prune_model(model, target, indices))

    [pruned] = run_distributed(plain, world_size=1, args=(teacher, sd, target, indices))
    for name, tensor in prune_global(sd, teacher, target, indices).items():
        assert torch.equal(pruned[name], tensor), name


def test_the_ridge_moves_the_refit_from_least_squares_to_the_plain_prune():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    w_full = torch.randn(5, 9, generator=g, dtype=torch.float64)
    full = torch.cat([a, a[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)], dim=1)
    y = full @ w_full.T
    stats = Statistics(a.T @ a, y.T @ a, y.square().sum())
    w_kept = w_full[:, :6]
    errors = [stats.error(refit(w_kept, stats, ridge)) for ridge in (1e6, 1.0, 1e-2, 1e-8)]
    assert errors == sorted(errors, reverse=True) and errors[0] <= stats.error(w_kept)
    torch.testing.assert_close(refit(w_kept, stats, 1e9), w_kept, rtol=1e-6, atol=1e-7)
    assert errors[-1] < 1e-12  # the pruned columns are linear in the kept ones: recovered exactly


def test_bytes_per_layer_are_stated_for_an_8b_ffn():
    assert bytes_per_layer(4096, 9216) / 1e9 == pytest.approx(0.982, abs=1e-3)


def _prune_model_refusals(teacher, target, indices) -> tuple[str, str]:
    """prune_model's messages for a non-positive ridge and for reconstruction with head_residual."""
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning import prune_model

    messages = []
    for ridge, head_residual in ((-1.0, False), (1.0, True)):
        with pytest.raises(UserError) as err:
            prune_model(build_gpt_model(teacher), target, indices, head_residual, Reconstruction({}, ridge))
        messages.append(str(err.value))
    return tuple(messages)


def test_refused_combinations_are_one_line():
    from nemo_minitron.pruning.reconstruct import check_reconstructable
    from nemo_minitron.pruning.stage import PruneConfig

    with pytest.raises(UserError, match="mixtures of experts"):
        check_reconstructable(tiny_moe_arch())
    with pytest.raises(UserError, match="choose one"):
        PruneConfig(checkpoint="c", output_dir="o", reconstruct=True, head_residual=True).validate()
    with pytest.raises(UserError, match="reconstruct_ridge=0 must be > 0"):
        PruneConfig(checkpoint="c", output_dir="o", reconstruct=True, reconstruct_ridge=0).validate()
    teacher, _, _, target, indices = _teacher()
    [(ridge, residual)] = run_distributed(_prune_model_refusals, world_size=1, args=(teacher, target, indices))
    assert "reconstruct_ridge=-1.0 must be > 0" in ridge and "choose one" in residual


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4)])
def test_reconstruction_at_tp_and_pp_equals_tp1(reference, tp, pp, world):
    teacher, _, sd, target, indices, ref_pruned, ref_errors = reference
    for pruned, errors in run_distributed(pruned_with_reconstruction, world, tp, pp, (teacher, sd, target, indices)):
        assert pruned.keys() == ref_pruned.keys()
        for name, tensor in ref_pruned.items():
            torch.testing.assert_close(pruned[name], tensor, rtol=1e-4, atol=5e-6, msg=name)
        for consumer, record in ref_errors.items():
            assert errors[consumer]["layers"] == record["layers"]
            np.testing.assert_allclose(errors[consumer]["after"], record["after"], rtol=1e-4, atol=1e-7)


# --- hybrid (Mamba) models -------------------------------------------------------------------------

HYBRID_PATTERN = "M*-M-"  # Mamba, attention, MLP, Mamba, MLP; the last layer dropped


def _hybrid_teacher():
    from test_hybrid import hybrid_hf, prune_indices

    teacher, hf = hybrid_hf(tie=False, hybrid_pattern=HYBRID_PATTERN)
    target = PruneSpec(drop_layers=[4], hidden_size=48, ffn_hidden_size=64, num_attention_heads=2,
                       mamba_num_heads=4, mamba_head_dim=7).target_arch(teacher)
    sd = bridge.hf_to_global(teacher, hf.state_dict())
    return teacher, hf, sd, target, prune_indices(teacher, target, [4], seed=4)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _hf_hybrid_inputs(hf, teacher, indices) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, consumer): (the pruned consumer's input on the kept columns, the teacher's output)}
    from transformers' NemotronH: down_proj / o_proj inputs restricted to the kept columns, and for
    a Mamba layer the gated norm RMSNorm(y * silu(z)) * w recomputed in numpy over each SSM
    group's kept channels (from the norm's inputs y, z)."""
    captured, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        kind = teacher.layer_types[i]
        consumer = {"mamba": "out_proj", "attention": "o_proj", "mlp": "down_proj"}[kind]
        if kind == "mamba":
            handles.append(layer.mixer.norm.register_forward_pre_hook(
                lambda module, args, i=i: captured.__setitem__((i, "norm"), [a.double().numpy() for a in args])))

        def hook(module, args, output, i=i, kind=kind):
            flat = lambda t: t.reshape(-1, t.shape[-1]).double().numpy()  # noqa: E731
            captured[i, kind] = (flat(args[0]), flat(output))
        handles.append(getattr(layer.mixer, consumer).register_forward_hook(hook))
    with torch.no_grad():
        hf(WINDOWS[:, :-1])
    for handle in handles:
        handle.remove()
    inputs = {}
    for i in indices.layers:
        kind = teacher.layer_types[i]
        a, y = captured[i, kind]
        columns = kept_columns(indices, i, kind, teacher).numpy()
        if kind == "mamba":
            scan, gate = (t.reshape(-1, t.shape[-1])[:, columns] for t in captured[i, "norm"])
            u = (scan * _silu(gate)).reshape(len(scan), teacher.mamba_num_groups, -1)
            normed = u / np.sqrt((u ** 2).mean(-1, keepdims=True) + 1e-5)
            weight = hf.state_dict()[f"model.layers.{i}.mixer.norm.weight"].double().numpy()[columns]
            inputs[i, kind] = normed.reshape(len(scan), -1) * weight, y
        else:
            inputs[i, kind] = a[:, columns], y
    return inputs


def test_hybrid_refit_equals_numpy_on_transformers_activations():
    """A hybrid's MLP, attention and Mamba layers each refit their consumer; the Mamba out_proj
    fits the input the pruned layer computes (its gated norm over the kept channels of each group),
    not the teacher's input restricted to them. numpy on transformers' NemotronH gives the same
    weights and calibration errors, and the refit lowers every error."""
    teacher, hf, sd, target, indices = _hybrid_teacher()
    [(pruned, errors)] = run_distributed(pruned_with_reconstruction, world_size=1, args=(teacher, sd, target, indices))
    names = {"mamba": "mixer.out_proj.weight", "attention": "self_attention.linear_proj.weight",
             "mlp": "mlp.linear_fc2.weight"}
    hf_names = {"mamba": "out_proj", "attention": "o_proj", "mlp": "down_proj"}
    plain = prune_global(sd, teacher, target, indices)
    for (layer, kind), (a, y) in _hf_hybrid_inputs(hf, teacher, indices).items():
        new = indices.layers.index(layer)
        columns = kept_columns(indices, layer, kind, teacher).numpy()
        w_kept = hf.state_dict()[f"model.layers.{layer}.mixer.{hf_names[kind]}.weight"].double().numpy()[:, columns]
        expected = _numpy_refit(a, y, w_kept, RIDGE)
        got = pruned[f"decoder.layers.{new}.{names[kind]}"]
        np.testing.assert_allclose(got.double().numpy(), expected[indices.hidden.numpy()], rtol=2e-4, atol=2e-6)
        assert not torch.equal(got, plain[f"decoder.layers.{new}.{names[kind]}"])
        at = errors[kind]["layers"].index(layer)
        before, after = _relative_error(a, y, w_kept), _relative_error(a, y, expected)
        assert errors[kind]["before"][at] == pytest.approx(before, rel=1e-4, abs=1e-6)
        assert errors[kind]["after"][at] == pytest.approx(after, rel=1e-4, abs=1e-6) and after < before
    assert sorted(errors) == ["attention", "mamba", "mlp"] and errors["mamba"]["layers"] == [0, 3]


@pytest.mark.slow
def test_hybrid_reconstruction_at_tp2_equals_tp1():
    teacher, _, sd, target, indices = _hybrid_teacher()
    [(reference, _)] = run_distributed(pruned_with_reconstruction, world_size=1, args=(teacher, sd, target, indices))
    [(pruned, _), _] = run_distributed(pruned_with_reconstruction, 2, 2, 1, (teacher, sd, target, indices))
    assert pruned.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(pruned[name], tensor, rtol=1e-4, atol=5e-6, msg=name)
