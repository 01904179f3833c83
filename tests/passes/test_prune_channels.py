"""Channel pruning against an independent oracle: the unpruned model with the channels masked."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.channel_groups import analyze_channels
from passes.normalize import normalize
from passes.prune_channels import PruneError, prune_channels
from tests.light import LARGE, SMALL, light_normalized, strip_softmax
from tests.oracles import masked_model, random_feeds, randomize_weights, run_ort


def _random_halves(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: np.sort(rng.choice(g.length, max(1, g.length // 2), replace=False)) for g in groups}


def _assert_prune_equals_mask(model, analysis, keep, feeds, tol=1e-4, full_check=True):
    pruned = prune_channels(model, keep, analysis)
    if full_check:
        onnx.checker.check_model(pruned, full_check=True)
    masked = masked_model(model, analysis, keep)
    (got,), (want,) = run_ort(pruned, feeds), run_ort(masked, feeds)
    scale = max(np.abs(want).max(), 1e-6)
    assert np.abs(got - want).max() / scale < tol
    return pruned


@pytest.fixture(scope="module")
def randomized():
    cache = {}

    def get(name):
        if name not in cache:
            model = randomize_weights(strip_softmax(light_normalized(name)))
            cache[name] = (model, analyze_channels(model), random_feeds(model))
        return cache[name]

    return get


@pytest.mark.parametrize("name", SMALL + tuple(pytest.param(n, marks=pytest.mark.slow) for n in LARGE))
def test_all_groups_at_once(randomized, name):
    model, analysis, feeds = randomized(name)
    keep = _random_halves(analysis.prunable_groups())
    pruned = _assert_prune_equals_mask(model, analysis, keep, feeds)
    before = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    after = sum(int(np.prod(t.dims)) for t in pruned.graph.initializer)
    assert not keep or after < before


@pytest.mark.parametrize("name", ["squeezenet"] + [pytest.param(n, marks=pytest.mark.slow) for n in (
    "resnet50", "inception_v1", "inception_v2", "densenet121", "bvlc_alexnet", "zfnet512")])
def test_every_group_alone(randomized, name):
    """Each group pruned on its own equals the masked model: every group of squeezenet, and five groups
    drawn (seeded) from each bigger model, whose every group costs minutes (vgg19: 230 s) and adds
    little over test_all_groups_at_once. VGG-19 (55 s here) is pruned whole there only: its groups couple
    as ZFNet-512's five (conv -> conv, conv -> pool -> flatten -> Gemm, Gemm -> Gemm: each tested here),
    AlexNet's Dropout -> Gemm and squeezenet's conv -> pool -> conv."""
    model, analysis, feeds = randomized(name)
    groups = analysis.prunable_groups()
    assert groups
    if name != "squeezenet" and len(groups) > 5:
        picked = np.random.default_rng(len(groups)).choice(len(groups), 5, replace=False)
        groups = [groups[i] for i in sorted(picked)]
    for seed, group in enumerate(groups):  # the full checker runs on the first and in test_all_groups_at_once
        _assert_prune_equals_mask(model, analysis, _random_halves([group], seed), feeds, full_check=seed == 0)


def test_unprunable_group_is_refused(randomized):
    model, analysis, _ = randomized("shufflenet")
    refused = [g for g in analysis.groups if not g.prunable]
    assert refused and not analysis.prunable_groups()
    with pytest.raises(PruneError, match="cannot be pruned"):
        prune_channels(model, {refused[0].id: [0]}, analysis)


def test_bad_requests_are_refused(randomized):
    model, analysis, _ = randomized("squeezenet")
    g = analysis.prunable_groups()[0]
    with pytest.raises(PruneError, match="unknown channel group"):
        prune_channels(model, {10_000: [0]}, analysis)
    with pytest.raises(PruneError, match="must lie in"):
        prune_channels(model, {g.id: [g.length]}, analysis)
    with pytest.raises(PruneError, match="at least one"):
        prune_channels(model, {g.id: []}, analysis)


def test_keep_everything_is_identity(randomized):
    model, analysis, feeds = randomized("squeezenet")
    keep = {g.id: range(g.length) for g in analysis.prunable_groups()}
    same = prune_channels(model, keep, analysis)
    np.testing.assert_array_equal(run_ort(same, feeds)[0], run_ort(model, feeds)[0])


# --- one tiny model per coupling case, written in ONNX text ----------------------------------

def _model(text: str, seed: int = 0, values: dict | None = None) -> onnx.ModelProto:
    """Parse a graph whose first input is the data; every other input becomes a random weight
    (or the value given in `values`)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    values = values or {}
    for inp in list(model.graph.input)[1:]:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        arr = values.get(inp.name)
        if arr is None:
            arr = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(arr, inp.name))
    return randomize_weights(normalize(model, fold_batchnorm=False), seed)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

RESIDUAL = HEADER + """
g (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8,8,1,1] w3,
   float[10,8] wf, float[10] bf) => (float[1,10] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (a)
  c = Conv <pads=[1,1,1,1]> (r, w2)
  s = Add (c, a)
  d = Conv (s, w3)
  e = Add (d, s)
  p = GlobalAveragePool (e)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}"""

CONCAT_DEPTHWISE = HEADER + """
g (float[1,3,8,8] x, float[6,3,1,1] w1, float[4,3,1,1] w2, float[10,1,3,3] wd, float[10] bd,
   float[10] sc, float[10] bb, float[10] mu, float[10] var, float[5,160] wf) => (float[1,5] y) {
  a = Conv (x, w1)
  b = Conv (x, w2)
  c = Concat <axis=1> (a, b)
  d = Conv <group=10, pads=[1,1,1,1]> (c, wd, bd)
  n = BatchNormalization (d, sc, bb, mu, var)
  r = Relu (n)
  q = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
  f = Flatten (q)
  y = Gemm <transB=1> (f, wf)
}"""

FFN = HEADER + """
g (float[2,4,6] x, float[6,12] w1, float[12] b1, float[12,6] w2, float[6] b2) => (float[2,4,6] y) {
  h = MatMul (x, w1)
  hb = Add (h, b1)
  a = Relu (hb)
  o = MatMul (a, w2)
  y = Add (o, b2)
}"""

RESHAPE_SPLIT = HEADER + """
g (float[2,4,6] x, float[6,8] w1, int64[4] shp, int64[3] back, float[8,8] w2) => (float[2,4,8] y) {
  h = MatMul (x, w1)
  r = Reshape (h, shp)
  t = Transpose <perm=[0,1,3,2]> (r)
  u = Reshape (t, back)
  y = MatMul (u, w2)
}"""


def _check_tiny(text: str, expect_prunable: int):
    model = _model(text)
    analysis = analyze_channels(model)
    groups = analysis.prunable_groups()
    assert len(groups) == expect_prunable, [(g.id, g.refusal) for g in analysis.groups]
    feeds = random_feeds(model)
    for seed, g in enumerate(groups):
        _assert_prune_equals_mask(model, analysis, _random_halves([g], seed), feeds)
    if groups:
        _assert_prune_equals_mask(model, analysis, _random_halves(groups), feeds)
    return model, analysis


def test_residual_adds_union_producers():
    model, analysis = _check_tiny(RESIDUAL, expect_prunable=1)
    (group,) = analysis.prunable_groups()
    assert set(group.producers) == {n.name for n in model.graph.node if n.op_type == "Conv"}


def test_concat_offsets_depthwise_batchnorm_flatten_gemm():
    model, analysis = _check_tiny(CONCAT_DEPTHWISE, expect_prunable=2)
    d = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1].startswith("wd"))
    pruned = prune_channels(model, _random_halves(analysis.prunable_groups()), analysis)
    d2 = next(n for n in pruned.graph.node if n.name == d.name)
    assert onnx.helper.get_attribute_value(next(a for a in d2.attribute if a.name == "group")) == 5


def test_ffn_hidden_dim_is_prunable():
    _check_tiny(FFN, expect_prunable=1)


def test_reshape_that_splits_channels_is_refused():
    model = _model(RESHAPE_SPLIT, values={"shp": np.array([2, 4, 2, 4], np.int64),
                                          "back": np.array([2, 4, 8], np.int64)})
    analysis = analyze_channels(model)
    first = analysis.groups[analysis.group_of_source[analysis.kernel_source[model.graph.node[0].name]]]
    assert not first.prunable and "Reshape" in first.refusal


@pytest.mark.parametrize("name", ["resnet20", "vgg", "mobilenetv2", "vit"])
def test_reference_models_every_group_alone_and_together(reference_models, name):
    model = normalize(onnx.load(str(reference_models(name))))
    analysis = analyze_channels(model)
    groups = analysis.prunable_groups()
    assert groups, "every reference model has something to prune"
    feeds = random_feeds(model, batch=3)
    for seed, group in enumerate(groups):
        _assert_prune_equals_mask(model, analysis, _random_halves([group], seed), feeds)
    _assert_prune_equals_mask(model, analysis, _random_halves(groups), feeds)


def test_vit_groups_are_what_a_transformer_allows(reference_models):
    model = normalize(onnx.load(str(reference_models("vit"))))
    analysis = analyze_channels(model)
    prunable = analysis.prunable_groups()
    # only the MLP hidden dims: the residual stream is normalised by LayerNorm, heads are not followed
    assert all(len(g.producers) == 1 and "mlp" in g.producers[0] for g in prunable)
    stream = analysis.group_of_kernel(next(n.name for n in model.graph.node if n.op_type == "Conv"))
    assert "LayerNormalization" in stream.refusal and len(stream.producers) > 1


CONV_TRANSPOSE = HEADER + """
g (float[1,3,4,4] x, float[6,3,3,3] w1, float[6] b1, float[6,5,2,2] wt, float[5] bt, float[4,5,1,1] w3)
  => (float[1,4,8,8] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (a)
  u = ConvTranspose <strides=[2,2]> (r, wt, bt)
  v = Relu (u)
  y = Conv (v, w3)
}"""


def test_conv_transpose_produces_and_consumes_groups():
    model, analysis = _check_tiny(CONV_TRANSPOSE, expect_prunable=2)
    up = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    pruned = prune_channels(model, _random_halves(analysis.prunable_groups()), analysis)
    weight = next(t for t in pruned.graph.initializer if t.name == next(
        n for n in pruned.graph.node if n.name == up.name).input[1])
    assert list(weight.dims) == [3, 2, 2, 2]  # input channels 6 -> 3 (axis 0), output 5 -> 2 (axis 1)
