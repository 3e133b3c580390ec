"""The TopK SAE: formulas, save/load in our, SAELens's and sparsify's layouts, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from safer_audit.common.digests import DIGEST_LENGTH
from safer_audit.config import SaeTrainConfig
from safer_audit.sae import SaeConfig, SaeFormatError, TopKSAE, evaluate_sae, shuffled_batches, train_sae


def make_sae(d_in=16, n_latents=64, k=4, seed=0, **kwargs) -> TopKSAE:
    sae = TopKSAE(SaeConfig(d_in, n_latents, k, **kwargs), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # nonzero biases, so that a mix-up of b_enc / b_pre shows
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_pre.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae


def hidden(n=50, d_in=16, seed=3) -> torch.Tensor:
    return 3 * torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) + 1.5


def dense_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The reference TopK activation: keep the k largest pre-activations, ReLU, zero the rest."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def sparse_ground_truth(n_tokens=16384, d_in=32, n_true=48, per_token=3, seed=1):
    """Tokens that are positive mixes of ``per_token`` of ``n_true`` unit atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_true, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, n_true, generator=g).topk(per_token, dim=1).indices
    coef = torch.rand(n_tokens, per_token, generator=g) + 0.5
    return (coef.unsqueeze(-1) * atoms[which]).sum(1), atoms


# --- the model ------------------------------------------------------------------------


def test_normalize_is_per_token_layer_norm():
    sae = make_sae()
    h = hidden()
    mean, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
    torch.testing.assert_close(sae.normalize(h), (h - mean) / (std + 1e-6))
    assert torch.equal(make_sae(normalize="none").normalize(h), h)


def test_encode_matches_the_method_formula():
    sae = make_sae()
    h = hidden()
    x = sae.normalize(h)
    pre = (x - sae.b_pre) @ sae.W_enc + sae.b_enc
    z = sae.encode_dense(h)
    torch.testing.assert_close(z, dense_codes(pre, sae.k).detach())
    assert (z >= 0).all() and ((z != 0).sum(-1) <= sae.k).all()
    out = sae(h)
    torch.testing.assert_close(out.x_hat, (z @ sae.W_dec + sae.b_pre).detach(), atol=1e-5, rtol=1e-5)
    expected_fvu = ((out.x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    torch.testing.assert_close(out.fvu, expected_fvu)


def test_decoder_starts_as_unit_norm_transpose_of_encoder():
    sae = TopKSAE(SaeConfig(16, 64, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    cosine = torch.nn.functional.cosine_similarity(sae.W_dec, sae.W_enc.T, dim=1)
    torch.testing.assert_close(cosine, torch.ones(64))
    assert not sae.b_pre.any() and not sae.b_enc.any()


def test_encode_and_decode_accept_leading_dimensions():
    sae = make_sae()
    h = hidden(n=24).reshape(2, 12, 16)
    vals, idx = sae.encode(h)
    assert vals.shape == idx.shape == (2, 12, 4)
    flat_vals, flat_idx = sae.encode(h.reshape(24, 16))
    torch.testing.assert_close(sae.decode(vals, idx).reshape(24, 16), sae.decode(flat_vals, flat_idx))


def test_auxk_loss_only_with_dead_latents_and_only_reaches_them():
    sae = make_sae()
    h = hidden()
    assert sae(h).auxk_loss == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:40] = True
    out = sae(h, dead_mask=dead)
    assert out.auxk_loss > 0
    out.auxk_loss.backward()
    assert sae.W_dec.grad[40:].abs().sum() == 0  # live latents are not asked to fit the residual
    assert sae.W_dec.grad[:40].abs().sum() > 0


def dense_forward_loss(sae: TopKSAE, h: torch.Tensor, dead: torch.Tensor, auxk_alpha: float) -> torch.Tensor:
    """The training loss written densely, straight from docs/method.md: the reference for the sparse backward."""
    x = sae.normalize(h)
    pre = (x - sae.b_pre) @ sae.W_enc + sae.b_enc
    codes = dense_codes(pre, sae.k)
    residual = x - (codes @ sae.W_dec + sae.b_pre)
    norm2 = x.pow(2).sum(-1)
    fvu = (residual.pow(2).sum(-1) / norm2).mean()
    k_aux = min(sae.cfg.d_in // 2, int(dead.sum()))
    aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values.relu())
    scale = min(int(dead.sum()) / (sae.cfg.d_in // 2), 1.0)
    auxk = scale * ((aux_codes @ sae.W_dec - residual.detach()).pow(2).sum(-1) / norm2).mean()
    return fvu + auxk_alpha * auxk


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_sparse_backward_gives_the_dense_gradients(n_dead):
    # the forward pass builds no dense [tokens, n_latents] gradient; every parameter's gradient
    # (top-k and AuxK paths, b_pre through the encoder input) must still equal the dense formula's
    sae = make_sae().double()
    h = hidden().double()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    out = sae(h, dead_mask=dead)
    (out.fvu + 0.5 * out.auxk_loss).backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_forward_loss(sae, h, dead, 0.5).backward()
    for name, p in sae.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_sparse_linear_backward_matches_gradcheck():
    from safer_audit.sae.model import _SparseLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.double, requires_grad=True)
    w = torch.randn(5, 9, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.double, requires_grad=True)
    idx = torch.rand(6, 9, generator=g).argsort(-1)[:, :4]  # distinct latents per token, one latent many tokens

    def picked(x, w, b):
        return _SparseLinear.apply(x, w, b, idx, (x @ w + b).gather(-1, idx).detach())

    torch.testing.assert_close(picked(x, w, b), (x @ w + b).gather(-1, idx))
    assert torch.autograd.gradcheck(picked, (x, w, b))


def test_decoder_is_row_major():
    # a column-major W_dec (the transposed strides of W_enc) made every embedding_bag decode ~60x slower
    assert TopKSAE(SaeConfig(16, 64, 4)).W_dec.is_contiguous()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        SaeConfig(16, 64, 4, normalize="rms")
    with pytest.raises(ValueError, match="k must be"):
        SaeConfig(16, 8, 9)


# --- save and load --------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    sae = make_sae(metadata={"model": "minilm", "layer": 3, "positions": "response"})
    target = tmp_path / "sae"
    sae.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((target / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["normalize_activations"] == "layer_norm" and cfg["apply_b_dec_to_input"] is True
    loaded = TopKSAE.load(target)
    assert loaded.cfg == sae.cfg
    for name in ("W_enc", "W_dec", "b_enc", "b_pre"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    h = hidden()
    assert torch.equal(loaded.encode_dense(h), sae.encode_dense(h))


def test_save_over_existing_directory_replaces_files_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sae"
    make_sae(seed=0).save(target)
    (target / "README.md").write_text("kept")
    first_hash = TopKSAE.file_hash(target)
    assert TopKSAE.file_hash(target) == first_hash and len(first_hash) == DIGEST_LENGTH
    second = make_sae(seed=5)
    second.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "cfg.json", "sae_weights.safetensors"]
    assert TopKSAE.file_hash(target) != first_hash
    assert torch.equal(TopKSAE.load(target).W_enc, second.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def saelens_topk_layer_norm_reference(h, t, k, apply_b_dec_to_input=True):
    """SAELens's TopKSAE.encode with normalize_activations="layer_norm", written out."""
    mu = h.mean(-1, keepdim=True)
    x = h - mu
    x = x / (x.std(-1, keepdim=True) + 1e-5)
    sae_in = x - t["b_dec"] * apply_b_dec_to_input
    return dense_codes(sae_in @ t["W_enc"] + t["b_enc"], k), x


def saelens_tensors(d_in=16, d_sae=64, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / 4,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / 4,  # SAELens does not force unit norm
        "b_enc": torch.randn(d_sae, generator=g) / 10,
        "b_dec": torch.randn(d_in, generator=g) / 10,
    }


def test_load_saelens_v6_topk_layout(tmp_path):
    tensors = saelens_tensors()
    cfg = {
        "d_in": 16,
        "d_sae": 64,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm",
        "reshape_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"},
        "architecture": "topk",
        "k": 5,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    sae = TopKSAE.load(tmp_path)
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.k, sae.cfg.normalize) == (16, 64, 5, "layer_norm")
    assert sae.cfg.metadata["source"] == "saelens"
    h = hidden()
    z_ref, x_ref = saelens_topk_layer_norm_reference(h, tensors, 5)
    torch.testing.assert_close(sae.encode_dense(h), z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.decode(*sae.encode(h)), z_ref @ tensors["W_dec"] + tensors["b_dec"], atol=1e-4, rtol=1e-4)


def test_load_old_saelens_layout_folds_b_dec_out_of_the_input(tmp_path):
    tensors = saelens_tensors()
    cfg = {
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 6},
        "d_in": 16,
        "d_sae": 64,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "model_name": "pythia-70m",
        "hook_layer": 3,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    sae = TopKSAE.load(tmp_path)
    assert sae.k == 6 and sae.cfg.normalize == "none"
    assert sae.cfg.metadata == {"source": "saelens", "model_name": "pythia-70m", "hook_layer": 3}
    h = hidden()
    expected = dense_codes(h @ tensors["W_enc"] + tensors["b_enc"], 6)
    torch.testing.assert_close(sae.encode_dense(h), expected, atol=1e-4, rtol=1e-4)


def sparsify_directory(path, d_in=16, n_latents=64, k=4, seed=11):
    """A directory exactly as sparsify's SparseCoder.save_to_disk writes it."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(n_latents, d_in, generator=g) / 4,
        "encoder.bias": torch.randn(n_latents, generator=g) / 10,
        "W_dec": torch.randn(n_latents, d_in, generator=g) / 4,
        "b_dec": torch.randn(d_in, generator=g) / 10,
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": n_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    path.mkdir(exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "sae.safetensors")
    return tensors


def test_load_sparsify_layout(tmp_path):
    tensors = sparsify_directory(tmp_path)
    sae = TopKSAE.load(tmp_path)
    assert sae.cfg.normalize == "none" and sae.cfg.metadata == {"source": "sparsify"}
    h = hidden()
    pre = torch.relu((h - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    torch.testing.assert_close(sae.encode_dense(h), dense_codes(pre, 4), atol=1e-5, rtol=1e-5)


def test_load_what_sparsify_itself_saved(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=4))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    coder.save_to_disk(tmp_path)
    sae = TopKSAE.load(tmp_path)
    h = hidden()
    with torch.no_grad():
        theirs = coder(h)
        vals, idx = sae.encode(h)
        ours = sae(h)
    z_theirs = torch.zeros(len(h), 64).scatter(-1, theirs.latent_indices, theirs.latent_acts)
    torch.testing.assert_close(torch.zeros(len(h), 64).scatter(-1, idx, vals), z_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.x_hat, theirs.sae_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "cfg.json").write_text('{\n  "d_in": 16,\n  oops\n}'), r"cfg\.json:3: invalid JSON"),
        (lambda d: _edit_cfg(d, lambda c: c.pop("k")), r'cfg\.json: field "k" is missing'),
        (lambda d: _edit_cfg(d, lambda c: c.update(architecture="jumprelu")), r'field "architecture" is .jumprelu.'),
        (lambda d: _edit_cfg(d, lambda c: c.update(d_sae=65)), r'sae_weights\.safetensors: tensor "W_enc" has shape \[16, 64\], expected \[16, 65\]'),
        (lambda d: _edit_cfg(d, lambda c: c.update(normalize_activations="constant_norm_rescale")), r'field "normalize_activations"'),
        (lambda d: _edit_cfg(d, lambda c: c.update(k=0)), r"cfg\.json: k must be"),
        (lambda d: _edit_cfg(d, lambda c: c["safer_audit"].update(format_version=99)), r"format_version. is newer"),
        (lambda d: (d / "sae_weights.safetensors").write_bytes(b"\x80\x04not safetensors"), r"sae_weights\.safetensors: not a readable safetensors"),
        (lambda d: (d / "sae_weights.safetensors").rename(d / "sae_weights.pt"), r"no sae_weights\.safetensors"),
    ],
)
def test_bad_sae_directory_gives_one_line_error_naming_file_and_field(tmp_path, change, message):
    make_sae().save(tmp_path / "sae")
    change(tmp_path / "sae")
    with pytest.raises(SaeFormatError, match=message) as info:
        TopKSAE.load(tmp_path / "sae")
    assert "\n" not in str(info.value)


def _edit_cfg(directory, edit):
    cfg = json.loads((directory / "cfg.json").read_text())
    edit(cfg)
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_sparsify_transcoder_is_refused(tmp_path):
    sparsify_directory(tmp_path)
    _edit_cfg(tmp_path, lambda c: c.update(transcode=True))
    with pytest.raises(SaeFormatError, match='field "transcode"'):
        TopKSAE.load(tmp_path)


# --- training -------------------------------------------------------------------------


def test_shuffled_batches_cover_every_token_once_in_a_seeded_order():
    tokens = torch.arange(70_000, dtype=torch.float32).unsqueeze(1)
    chunks = list(tokens.split(3000))

    def run(seed):
        return list(shuffled_batches(chunks, 1024, torch.Generator().manual_seed(seed), 1))

    batches = run(0)
    assert len(batches) == math.ceil(70_000 / 1024)
    assert all(len(b) == 1024 for b in batches[:-1])
    assert torch.equal(torch.cat(batches).flatten().sort().values, tokens.flatten())
    assert batches[0].max() > 3000  # mixed across chunk boundaries, not chunk by chunk
    assert all(torch.equal(a, b) for a, b in zip(batches, run(0), strict=True))
    assert not torch.equal(batches[0], run(1)[0])


def test_training_recovers_a_known_sparse_dictionary():
    h, atoms = sparse_ground_truth()
    cfg = SaeTrainConfig(n_latents=96, k=4, epochs=4, batch_size=256, lr=1e-2, dead_tokens=4096)
    seen = []
    sae, stats = train_sae(lambda: h.split(1000), 32, cfg, progress=lambda step, total, figures: seen.append((step, total, figures)))
    assert [s for s, _, _ in seen] == list(range(1, stats.steps + 1))
    assert seen[-1][1] == stats.steps == 4 * math.ceil(len(h) / 256)
    assert {"loss", "fvu", "auxk", "dead_fraction", "lr"} <= set(seen[0][2])
    first = sum(f["fvu"] for _, _, f in seen[:10]) / 10
    assert first > 0.5
    assert stats.fvu < 0.1 and stats.l0 <= 4 and stats.tokens_seen == 4 * len(h)
    assert evaluate_sae(sae, h.split(4096))["fvu"] < 0.1
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))
    # the layer norm centres each token, so the SAE sees the centred atoms
    centred = atoms - atoms.mean(1, keepdim=True)
    centred /= centred.norm(dim=1, keepdim=True)
    best_cosine = (centred @ sae.W_dec.detach().T).max(dim=1).values
    assert (best_cosine > 0.9).float().mean() > 0.9


def test_training_is_seeded_and_deterministic_and_stores_its_figures(tmp_path):
    h, _ = sparse_ground_truth(n_tokens=3000, d_in=16, n_true=20)
    cfg = SaeTrainConfig(n_latents=32, k=3, batch_size=256, seed=4)
    a, stats = train_sae(lambda: h.split(500), 16, cfg, metadata={"layer": 3})
    b, _ = train_sae(lambda: h.split(500), 16, cfg, n_tokens=len(h))
    c, _ = train_sae(lambda: h.split(500), 16, SaeTrainConfig(n_latents=32, k=3, batch_size=256, seed=5))
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_enc, c.W_enc)
    a.save(tmp_path / "sae")
    metadata = TopKSAE.load(tmp_path / "sae").cfg.metadata
    assert metadata["layer"] == 3
    assert metadata["training"]["fvu"] == stats.fvu and metadata["training"]["config"]["seed"] == 4


def test_b_pre_starts_at_the_mean_of_the_first_batch():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, generator=g)
    h = shared + 0.01 * torch.randn(2048, 16, generator=g)
    sae, _ = train_sae(lambda: [h], 16, SaeTrainConfig(n_latents=32, k=3, batch_size=256, lr=1e-9))
    expected = sae.normalize(shared.unsqueeze(0))[0]
    torch.testing.assert_close(sae.b_pre.detach(), expected, atol=0.02, rtol=0)


def test_auxk_revives_latents_that_plain_training_leaves_dead():
    # a learning rate this high kills many latents; AuxK must bring most of them back
    h, _ = sparse_ground_truth(n_tokens=8192, d_in=32, n_true=512, per_token=4, seed=2)

    def dead_after(auxk_alpha):
        cfg = SaeTrainConfig(n_latents=128, k=4, epochs=3, batch_size=256, lr=0.1, auxk_alpha=auxk_alpha, dead_tokens=2048)
        sae, _ = train_sae(lambda: h.split(1024), 32, cfg)
        return evaluate_sae(sae, h.split(4096))["dead_fraction"]

    without = dead_after(0.0)
    assert without > 0.2
    assert dead_after(1.0) < without / 4


def test_evaluate_counts_latents_that_never_fire_as_dead():
    sae = make_sae(n_latents=64, k=4)
    with torch.no_grad():
        sae.b_enc[:10] = -1e6
    figures = evaluate_sae(sae, hidden(n=200).split(64))
    assert figures["dead_fraction"] >= 10 / 64
    assert figures["l0"] <= 4 and figures["tokens"] == 200


def test_batches_of_the_wrong_width_are_refused():
    cfg = SaeTrainConfig(n_latents=32, k=3)
    with pytest.raises(ValueError, match=r"tokens, 16\], got \[10, 8\]"):
        train_sae(lambda: [torch.zeros(10, 8)], 16, cfg)
    with pytest.raises(ValueError, match="no activations"):
        train_sae(lambda: [], 16, cfg)
    with pytest.raises(ValueError, match="batch_size and epochs must be positive"):
        train_sae(lambda: [torch.zeros(10, 16)], 16, SaeTrainConfig(n_latents=32, k=3, epochs=0))


def test_topk_backend_is_registered_as_a_plugin(tmp_path):
    from safer_audit.plugins import sae_backends

    backend = sae_backends()["topk"]
    h, _ = sparse_ground_truth(n_tokens=1000, d_in=16, n_true=20)
    sae, stats = backend.train(lambda: h.split(500), 16, SaeTrainConfig(n_latents=32, k=3, batch_size=256))
    assert stats.steps == 4
    sae.save(tmp_path / "sae")
    assert torch.equal(backend.load(tmp_path / "sae").W_dec, sae.W_dec)
