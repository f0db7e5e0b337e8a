"""Tests of metanas.search_space: ops, normalisers, supernet, genotypes, discrete network."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, vmap

from metanas.errors import ConfigError
from metanas.search_space import (
    OP_PRESETS,
    OPS,
    DiscreteNetwork,
    Genotype,
    SearchNetwork,
    SearchSpaceConfig,
    alpha_shapes,
    anneal_temperature,
    build_op,
    derive_genotype,
    genotype_distance,
    init_alphas,
    normalize_alphas,
    resolve_ops,
)

DARTS = OP_PRESETS["darts"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**kw) -> SearchSpaceConfig:
    base = dict(in_channels=1, n_classes=3, channels=4, n_cells=3, n_nodes=3, stem_multiplier=2)
    return SearchSpaceConfig(**{**base, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- ops


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_op_keeps_channels_and_strides(name, stride):
    x = torch.randn(2, 4, 7, 7, generator=gen())
    y = build_op(name, 4, stride)(x)
    side = 7 if stride == 1 else 4
    assert y.shape == (2, 4, side, side)
    if name == "none":
        assert torch.count_nonzero(y) == 0


def test_op_details_follow_darts():
    assert OPS["avg_pool_3x3"](4, 1).op[0].count_include_pad is False
    assert isinstance(OPS["skip_connect"](4, 1), torch.nn.Identity)
    x = torch.randn(2, 4, 5, 5, generator=gen())
    assert torch.equal(OPS["skip_connect"](4, 1)(x), x)
    dil = OPS["dil_conv_3x3"](4, 1).op[1]
    assert dil.dilation == (2, 2) and dil.groups == 4
    conv15 = OPS["conv_1x5_5x1"](4, 2).op
    assert conv15[1].kernel_size == (1, 5) and conv15[1].stride == (2, 2)
    assert conv15[2].kernel_size == (5, 1) and conv15[2].stride == (1, 1)
    sep = OPS["sep_conv_5x5"](4, 2).op
    assert len(sep) == 2 and sep[0].op[1].stride == (2, 2) and sep[1].op[1].stride == (1, 1)
    with pytest.raises(TypeError):
        OPS["my_op"] = lambda C, s: torch.nn.Identity()  # read-only registry


def test_presets():
    assert len(OP_PRESETS["fewshot"]) == 7 and "none" not in OP_PRESETS["fewshot"]
    assert OP_PRESETS["darts"][0] == "none" and len(OP_PRESETS["darts"]) == 8
    assert resolve_ops("darts") == DARTS
    assert resolve_ops(["skip_connect", "conv_3x3"]) == ("skip_connect", "conv_3x3")


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: build_op("conv_9x9", 4, 1), "conv_9x9"),
        (lambda: resolve_ops("no_such_preset"), "no_such_preset"),
        (lambda: resolve_ops(["skip_connect", "bad_op"]), "bad_op"),
        (lambda: resolve_ops(["skip_connect", "skip_connect"]), "skip_connect"),
        (lambda: resolve_ops([]), "empty"),
        (lambda: resolve_ops(["none"]), "none"),
        (lambda: small_cfg(ops=("sep_conv_3x3", "wrong_op")), "wrong_op"),
        (lambda: small_cfg(ops="nopreset"), "nopreset"),
        (lambda: small_cfg(reduction_cells=(5,)), "reduction_cells"),
        (lambda: small_cfg(channels=0), "channels"),
        (lambda: small_cfg(prune_threshold=1.0), "prune_threshold"),
        (lambda: SearchSpaceConfig.from_dict({"chanels": 4}), "chanels"),
    ],
)
def test_bad_config_raises_config_error_naming_the_problem(call, bad):
    with pytest.raises(ConfigError, match=bad):
        call()


# ------------------------------------------------------------------- normaliser


def test_normalize_alphas_rows_sum_to_one_and_prune():
    a = torch.randn(3, 4, 6, generator=gen(1), dtype=torch.float64) * 2
    w = normalize_alphas(a, 0.5, prune_threshold=0.2)
    assert w.shape == a.shape
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    soft = torch.softmax(a / 0.5, -1)
    pruned = soft < torch.minimum(soft.amax(-1, keepdim=True), torch.tensor(0.2, dtype=soft.dtype))
    assert pruned.any() and (~pruned).any()
    assert torch.all(w[pruned] == 0.0)
    assert torch.all(w[~pruned] > 0.0)
    # kept entries keep their relative proportions
    kept = torch.where(pruned, torch.zeros_like(soft), soft)
    torch.testing.assert_close(w, kept / kept.sum(-1, keepdim=True))


def test_pruned_entries_get_exactly_zero_gradient():
    """Round-off gradients on pruned ops would be blown up to full steps by Adam."""
    a = torch.randn(6, 5, generator=gen(8), dtype=torch.float64)
    a[:, 0] = -5.0
    a.requires_grad_()
    t = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    w = normalize_alphas(a, t, prune_threshold=0.1)
    assert torch.all(w[:, 0] == 0.0)
    (ga,) = torch.autograd.grad((w * torch.randn(6, 5, dtype=torch.float64)).sum(), a)
    assert torch.all(ga[:, 0] == 0.0)
    assert torch.all(ga[w > 0] != 0.0)


def test_normalize_alphas_always_keeps_the_argmax():
    a = torch.tensor([[0.0, 0.1, 0.2, 0.05], [1.0, 1.0, 0.0, 0.0]])
    w = normalize_alphas(a, 1.0, prune_threshold=0.9)  # every weight is below 0.9
    assert torch.equal(w[0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # tied maxima both kept


def test_normalize_alphas_threshold_zero_is_plain_softmax():
    a = torch.randn(5, 7, generator=gen(2))
    assert torch.equal(normalize_alphas(a, 2.0, 0.0), torch.softmax(a / 2.0, -1))
    assert torch.equal(normalize_alphas(a, torch.tensor(2.0)), torch.softmax(a / 2.0, -1))


def test_normalize_alphas_gradcheck_float64():
    a = torch.tensor(
        [[2.0, 1.0, 0.0, -1.0, 0.5], [0.3, -2.0, 1.5, 0.0, 0.2]], dtype=torch.float64
    ).requires_grad_()
    t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(a.detach() / 0.8, -1)
    assert ((soft - 0.15).abs() > 1e-3).all()  # no entry on the pruning boundary
    assert (soft < 0.15).any()  # pruning is exercised
    assert torch.autograd.gradcheck(lambda a, t: normalize_alphas(a, t, 0.15), (a, t))


def test_normalize_alphas_vmaps_and_rejects_bad_args():
    a = torch.randn(4, 3, 5, generator=gen(3))
    batched = vmap(lambda x: normalize_alphas(x, 1.0, 0.3))(a)
    torch.testing.assert_close(batched, normalize_alphas(a, 1.0, 0.3))
    with pytest.raises(ConfigError, match="temperature"):
        normalize_alphas(a, 0.0)
    with pytest.raises(ConfigError, match="prune_threshold"):
        normalize_alphas(a, 1.0, 1.0)


def test_anneal_temperature():
    for mode in ("linear", "exponential"):
        temps = [anneal_temperature(s, 5, 4.0, 0.25, mode) for s in range(5)]
        assert temps[0] == 4.0 and temps[-1] == 0.25
        assert all(x > y for x, y in zip(temps, temps[1:]))
    assert anneal_temperature(2, 5, 4.0, 0.25, "linear") == pytest.approx(2.125)
    # exponential: the middle step is the geometric mean sqrt(4 * 0.25)
    assert anneal_temperature(2, 5, 4.0, 0.25, "exponential") == pytest.approx(1.0)
    assert [anneal_temperature(s, 3, 2.0, 0.5, "constant") for s in range(3)] == [2.0] * 3
    assert anneal_temperature(0, 1, 2.0, 0.5) == 2.0
    with pytest.raises(ConfigError, match="cosine"):
        anneal_temperature(0, 5, 1.0, 0.5, "cosine")
    with pytest.raises(ConfigError):
        anneal_temperature(0, 5, 1.0, 0.0)
    with pytest.raises(ConfigError):
        anneal_temperature(5, 5, 1.0, 0.5)


# ---------------------------------------------------------------------- network


def test_config_round_trip_and_derived_values():
    cfg = small_cfg(ops="darts", reduction_cells=[2, 0], pairwise_input_alphas=True)
    assert cfg.ops == DARTS and cfg.reduction_cells == (0, 2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert SearchSpaceConfig.from_dict(d) == cfg
    assert small_cfg(n_nodes=4).n_edges == 14
    assert SearchSpaceConfig(n_cells=3).resolved_reduction_cells() == (1, 2)
    assert SearchSpaceConfig(n_cells=8).resolved_reduction_cells() == (2, 5)
    assert alpha_shapes(cfg) == {
        "normal": (9, 8), "reduce": (9, 8), "normal_edges": (9,), "reduce_edges": (9,),
    }
    assert alpha_shapes(small_cfg(reduction_cells=())) == {"normal": (9, 7)}
    a = init_alphas(cfg, gen(0))
    assert all(not t.requires_grad and t.abs().max() < 0.01 for t in a.values())
    assert all(torch.equal(a[k], b) for k, b in init_alphas(cfg, gen(0)).items())


@pytest.mark.parametrize("preset", ["fewshot", "darts"])
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("reductions", [None, ()])
def test_supernet_forward_and_gradients(preset, pairwise, reductions):
    cfg = small_cfg(ops=preset, pairwise_input_alphas=pairwise, reduction_cells=reductions)
    net = SearchNetwork(cfg)
    assert list(net.buffers()) == []
    n_red = sum(c.reduction for c in net.cells)
    assert n_red == (2 if reductions is None else 0)
    alphas = {k: v.requires_grad_() for k, v in init_alphas(cfg, gen(0), scale=0.5).items()}
    x = torch.randn(4, 1, 8, 8, generator=gen(1))
    y = net(x, alphas, temperature=0.7)
    assert y.shape == (4, 3) and torch.isfinite(y).all()
    params = list(net.parameters())
    grads = torch.autograd.grad(y.square().sum(), params + list(alphas.values()))
    assert all(g is not None for g in grads)
    for k, g in zip(alphas, grads[len(params):]):
        assert g.abs().sum() > 0, k
    assert sum(g.abs().sum() for g in grads[: len(params)]) > 0


def test_parameter_names_are_stable():
    net = SearchNetwork(small_cfg(ops="darts"))
    names = dict(net.named_parameters())
    assert "stem.0.weight" in names and "classifier.weight" in names
    assert "cells.0.preproc0.op.1.weight" in names
    assert "cells.2.preproc0.conv1.weight" in names  # s0 after a reduction cell
    assert "cells.2.edges.4.ops.6.op.1.weight" in names  # dil_conv_3x3 depthwise conv
    assert "cells.1.edges.0.ops.3.conv1.weight" in names  # strided skip = FactorizedReduce


def test_bad_alphas_raise_config_error():
    cfg = small_cfg()
    net, x = SearchNetwork(cfg), torch.randn(2, 1, 8, 8)
    alphas = init_alphas(cfg)
    with pytest.raises(ConfigError, match=r"'normal'.*\(9, 6\).*\(9, 7\)"):
        net(x, {**alphas, "normal": torch.zeros(9, 6)})
    with pytest.raises(ConfigError, match="missing key 'reduce'"):
        net(x, {"normal": alphas["normal"]})
    with pytest.raises(ConfigError, match="normal_edges"):
        net(x, {**alphas, "normal_edges": torch.zeros(9)})
    with pytest.raises(ConfigError, match="in_channels"):
        net(torch.randn(2, 3, 8, 8), alphas)


def test_functional_call_and_vmap_match_a_loop():
    cfg = small_cfg(ops="darts", pairwise_input_alphas=True, prune_threshold=0.1)
    net = SearchNetwork(cfg).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    X = torch.randn(3, 4, 1, 8, 8, generator=gen(4), dtype=torch.float64)
    shared = {k: v.double() for k, v in init_alphas(cfg, gen(5), scale=1.0).items()}
    per_task = {k: torch.randn((3, *v.shape), generator=gen(6), dtype=torch.float64)
                for k, v in shared.items()}

    def f(x, a):
        return functional_call(net, params, (x, a))

    loop = torch.stack([f(X[t], shared) for t in range(3)])
    torch.testing.assert_close(vmap(lambda x: f(x, shared))(X), loop, atol=1e-10, rtol=0)
    loop = torch.stack([f(X[t], {k: v[t] for k, v in per_task.items()}) for t in range(3)])
    torch.testing.assert_close(vmap(f)(X, per_task), loop, atol=1e-10, rtol=0)


# --------------------------------------------------------------------- genotype


def hand_alphas() -> tuple[dict[str, torch.Tensor], Genotype]:
    """Alphas over the darts ops and their genotype.

    Op indices: none 0, max 1, avg 2, skip 3, sep3 4, sep5 5, dil3 6, dil5 7.
    """
    normal = torch.zeros(9, 8)
    normal[0, 0], normal[0, 4] = 10.0, 5.0  # strong 'none' is ignored, sep3 wins
    normal[1, 3] = 3.0  # skip
    normal[2, 0] = 20.0  # edge from input 0 is almost all 'none': weakest edge of node 1
    normal[3, 7] = 4.0  # dil5 from input 1
    normal[4, 1] = 2.0  # max pool from node 0
    normal[5, 2] = 1.0  # avg pool from input 0 (strength .28)
    normal[6, 5] = 3.0  # sep5 from input 1 (strength .74)
    # edge 7 uniform (strength 1/8)
    normal[8, 6] = 2.5  # dil3 from node 1 (strength .64)
    reduce = torch.zeros(9, 8)  # all ties: inputs 0, 1 and the first non-'none' op
    expected = Genotype(
        normal=(
            (("sep_conv_3x3", 0), ("skip_connect", 1)),
            (("dil_conv_5x5", 1), ("max_pool_3x3", 2)),
            (("sep_conv_5x5", 1), ("dil_conv_3x3", 3)),
        ),
        normal_concat=(2, 3, 4),
        reduce=((("max_pool_3x3", 0), ("max_pool_3x3", 1)),) * 3,
        reduce_concat=(2, 3, 4),
    )
    return {"normal": normal, "reduce": reduce}, expected


def test_derive_genotype_on_hand_made_alphas():
    alphas, expected = hand_alphas()
    assert derive_genotype(alphas, small_cfg(ops="darts")) == expected


def test_derive_genotype_pairwise_edges_and_k():
    cfg = small_cfg(ops="darts", reduction_cells=(), pairwise_input_alphas=True)
    alphas, _ = hand_alphas()
    edges = torch.zeros(9)
    edges[7], edges[8] = 5.0, 4.0  # node 2: inputs 2 and 3 dominate via edge weights
    g = derive_genotype({"normal": alphas["normal"], "normal_edges": edges}, cfg)
    assert g.normal[2] == (("max_pool_3x3", 2), ("dil_conv_3x3", 3))
    assert g.reduce == () and g.reduce_concat == ()
    g_all = derive_genotype({"normal": alphas["normal"], "normal_edges": edges}, cfg, k=10)
    assert [len(n) for n in g_all.normal] == [2, 3, 4]
    assert [j for _, j in g_all.normal[2]] == [0, 1, 2, 3]


def test_derive_genotype_never_chooses_none():
    cfg = small_cfg(ops="darts")
    for seed in range(5):
        a = init_alphas(cfg, gen(seed), scale=3.0)
        a = {k: v + torch.tensor([8.0] + [0.0] * 7) for k, v in a.items()}  # 'none' dominates
        g = derive_genotype(a, cfg, k=3)
        assert all(op != "none" for cell in (g.normal, g.reduce) for node in cell for op, _ in node)


def test_genotype_json_round_trip(tmp_path):
    _, g = hand_alphas()
    assert Genotype.from_json(g.to_json()) == g
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    g.save(tmp_path / "g.json")
    assert Genotype.load(tmp_path / "g.json") == g
    as_lists = Genotype(normal=[[["skip_connect", 0]]], normal_concat=[2])
    assert as_lists == Genotype(normal=((("skip_connect", 0),),), normal_concat=(2,))


@pytest.mark.parametrize(
    "text",
    [
        "not json at all",
        "[1, 2]",
        '{"normal": [[["skip_connect", "0"]]], "normal_concat": [2]}',
        '{"normal": [[["skip_connect", true]]], "normal_concat": [2]}',
        '{"normal": [[["skip_connect", 0, 1]]], "normal_concat": [2]}',
        '{"normal": [[["skip_connect", 0]]]}',
        '{"normal": [], "normal_concat": [2], "extra": 1}',
        '{"normal": [], "normal_concat": [-2]}',
    ],
)
def test_malformed_genotype_json_raises_config_error(text):
    with pytest.raises(ConfigError, match="genotype"):
        Genotype.from_json(text)


def test_genotype_json_with_python_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    for text in (code, json.dumps({"normal": code, "normal_concat": [2]})):
        with pytest.raises(ConfigError):
            Genotype.from_json(text)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="cannot read"):
        Genotype.load(tmp_path / "missing.json")


def test_genotype_distance():
    _, g = hand_alphas()
    assert genotype_distance(g, g) == 0.0
    other = Genotype(
        normal=((("avg_pool_3x3", 1), ("avg_pool_3x3", 0)),) * 3, normal_concat=(2, 3, 4),
        reduce=((("skip_connect", 0), ("skip_connect", 1)),) * 3, reduce_concat=(2, 3, 4),
    )
    assert genotype_distance(g, other) == 1.0
    one_off = Genotype(
        normal=(g.normal[0], (("dil_conv_5x5", 1), ("avg_pool_3x3", 2)), g.normal[2]),
        normal_concat=(2, 3, 4), reduce=g.reduce, reduce_concat=(2, 3, 4),
    )
    assert genotype_distance(g, one_off) == pytest.approx(1 / 12)
    no_reduce = Genotype(normal=g.normal, normal_concat=(2, 3, 4))
    assert genotype_distance(g, no_reduce) == pytest.approx(6 / 12)


# --------------------------------------------------------------------- discrete


def test_discrete_network_forward_and_validation():
    alphas, g = hand_alphas()
    cfg = small_cfg(ops="darts")
    net = DiscreteNetwork(g, cfg)
    assert list(net.buffers()) == []
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    n_ops = sum(len(n) for n in g.normal) * 1 + sum(len(n) for n in g.reduce) * 2
    assert sum(len(c.edges) for c in net.cells) == n_ops
    with pytest.raises(ConfigError, match="conv_3x3"):  # not in the darts preset
        DiscreteNetwork(Genotype(normal=((("conv_3x3", 0),),) * 3, normal_concat=(2, 3, 4),
                                 reduce=g.reduce, reduce_concat=(2, 3, 4)), cfg)
    with pytest.raises(ConfigError, match="input 3"):
        DiscreteNetwork(Genotype(normal=((("skip_connect", 3),),) * 3, normal_concat=(2, 3, 4),
                                 reduce=g.reduce, reduce_concat=(2, 3, 4)), cfg)
    with pytest.raises(ConfigError, match="n_nodes"):
        DiscreteNetwork(g, small_cfg(ops="darts", n_nodes=4))
    with pytest.raises(ConfigError, match="reduction"):
        DiscreteNetwork(g, small_cfg(ops="darts", reduction_cells=()))


def test_from_supernet_copies_every_weight():
    _, g = hand_alphas()
    cfg = small_cfg(ops="darts")
    sup = dict(SearchNetwork(cfg).named_parameters())
    net = DiscreteNetwork.from_supernet(g, cfg, sup)
    # node 1's first choice (entry j=2) is dil_conv_5x5 (op 7) from input 1: supernet edge 2+1=3
    src = net.supernet_param_name("cells.0.edges.2.op.1.weight")
    assert src == "cells.0.edges.3.ops.7.op.1.weight"
    assert net.supernet_param_name("stem.0.weight") == "stem.0.weight"
    for name, p in net.named_parameters():
        assert torch.equal(p, sup[net.supernet_param_name(name)]), name
    assert len(list(net.parameters())) > 0
    with pytest.raises(ConfigError, match="missing"):
        no_head = {k: v for k, v in sup.items() if "classifier" not in k}
        DiscreteNetwork.from_supernet(g, cfg, no_head)


def test_supernet_with_one_hot_alphas_equals_discrete_network():
    """Chosen edges put all weight on their op, other edges on 'none': the supernet is exact."""
    _, g = hand_alphas()
    cfg = small_cfg(ops="darts", prune_threshold=0.1)
    sup = SearchNetwork(cfg).double()
    alphas = {}
    for kind, nodes in (("normal", g.normal), ("reduce", g.reduce)):
        a = torch.zeros(cfg.n_edges, cfg.n_ops, dtype=torch.float64)
        a[:, 0] = 50.0  # 'none'
        for i, node in enumerate(nodes):
            for op, j in node:
                e = sup.edge_index(i, j)
                a[e] = 0.0
                a[e, cfg.ops.index(op)] = 50.0
        alphas[kind] = a
    assert derive_genotype(alphas, cfg) == g
    disc = DiscreteNetwork.from_supernet(g, cfg, dict(sup.named_parameters()))
    x = torch.randn(4, 1, 8, 8, generator=gen(7), dtype=torch.float64)
    torch.testing.assert_close(sup(x, alphas), disc(x), atol=1e-12, rtol=0)


def test_prune_threshold_at_or_above_uniform_is_refused():
    """At 1/n_ops near-uniform alphas keep only the argmax op: refused, naming the limit."""
    with pytest.raises(ConfigError, match=r"1/n_ops = 1/7 = 0.1429"):
        SearchSpaceConfig(prune_threshold=1 / 7)
    SearchSpaceConfig(prune_threshold=0.14)  # just below is allowed
    # what the refusal prevents: the alphas' gradient vanishes on near-uniform alphas
    a = (1e-3 * torch.randn(3, 7, generator=torch.Generator().manual_seed(0))).requires_grad_()
    normalize_alphas(a, 1.0, 1 / 7).sum().backward()
    assert torch.count_nonzero(a.grad) == 0


def test_genotype_has_only_the_cell_kinds_the_network_has():
    """A network of reduction cells alone reports no normal cell (its normal alphas are unread)."""
    only_red = SearchSpaceConfig(channels=4, n_cells=2, n_nodes=2, reduction_cells=(0, 1))
    g = derive_genotype(init_alphas(only_red, generator=torch.Generator().manual_seed(0)), only_red)
    assert g.normal == () and g.normal_concat == () and len(g.reduce) == 2
    no_red = SearchSpaceConfig(channels=4, n_cells=2, n_nodes=2, reduction_cells=())
    g = derive_genotype(init_alphas(no_red), no_red)
    assert g.reduce == () and len(g.normal) == 2
    # the discrete network of the reductions-only genotype builds and runs
    net = DiscreteNetwork.from_supernet(
        derive_genotype(init_alphas(only_red), only_red), only_red,
        dict(SearchNetwork(only_red).named_parameters()))
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 5)
