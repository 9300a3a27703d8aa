"""Diagonal Fisher information of the weights: how much the output distribution moves per unit
of weight error, in KL-divergence units, for every weight at once.

For a perturbation δ of the weights, KL(p_θ || p_θ+δ) ≈ ½ δᵀ F δ with F the Fisher information
of the model's *own* predictive distribution. We keep its diagonal:

    F_i = E_windows[ (∂/∂θ_i Σ_t log p(y_t | x_<t)) ² ],   y_t sampled from p_θ( · | x_<t)

With labels sampled from the model, the score of each position has zero mean given its context,
so the cross terms between positions vanish in expectation and one backward pass per window
gives the sum over its positions. Divided by the tokens per window, ½ Σ_i F_i δ_i² estimates the
mean per-token KL divergence that lowbit's evaluation reports. Cross-weight terms are ignored,
the usual diagonal approximation; it ranks tensors and types (what bit allocation needs), it
does not replace measuring.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lowbit.model.targets import WeightTarget


def diagonal_fisher(model: torch.nn.Module, windows: torch.Tensor, targets: list[WeightTarget], seed: int = 0,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """F per target parameter name (same shape as the parameter, float32), per token.

    One forward and backward per window; only the targets get gradients. Deterministic for a
    seed (labels are drawn from a seeded generator)."""
    params = {t.name: t.parameter(model) for t in targets}
    wanted = {id(p) for p in params.values()}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            for w in tqdm(windows, desc="fisher", disable=not progress, unit="window"):
                model.zero_grad(set_to_none=True)
                logits = model(w[None], use_cache=False).logits[0, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                logp.gather(-1, y).sum().backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name].addcmul_(p.grad, p.grad)
        n_tokens = windows.shape[0] * max(1, windows.shape[1] - 1)
        for f in fisher.values():
            f.div_(n_tokens)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    return fisher


def predicted_kld(fisher: torch.Tensor, error: torch.Tensor) -> float:
    """½ Σ F δ²: the diagonal-Fisher estimate of the mean per-token KL caused by weight error δ."""
    return 0.5 * float((fisher * error.float().square()).sum())


@torch.no_grad()
def layerwise_fisher(model: torch.nn.Module, weights, windows: torch.Tensor, targets: list[WeightTarget],
                     consume, workdir, seed: int = 0, progress: bool = True) -> None:
    """diagonal_fisher's values for a model whose parameters are on meta (model.lazy), one
    decoder layer in memory: a forward pass layer by layer keeps each layer's inputs (in
    `workdir`), the head gives each window's sampled-label loss and its gradient, then a backward
    pass reads the layers in reverse, recomputes each one's forward from its saved inputs and
    backpropagates. `consume(target, W, F)` is called for each target as soon as its F is
    complete, while its weight W is read (it must not keep W); nothing else is returned, so F
    and W never exist for the whole model. Same labels, same sums in the same order as the
    resident computation."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from lowbit.calib.runner import _layer_output, capture_layer_inputs, find_decoder_layers, run_to_first_layer
    from lowbit.errors import SchemeError
    from lowbit.model.arch import FINAL_NORMS, _get
    from lowbit.model.lazy import _replace_everywhere, checkpoint_names, materialize, materialize_parameters, release

    workdir = Path(workdir)
    prefix, layers = find_decoder_layers(model, targets)
    params = checkpoint_names(model)
    name_of = {id(p): n for n, p in params.items()}
    final_name = next((n for n in FINAL_NORMS if _get(model, n) is not None), None)
    if final_name is None:
        raise SchemeError(f"a size budget on a streamed {type(model).__name__} needs its final norm, which lowbit "
                          f"does not find ({', '.join(FINAL_NORMS)}); quantize without a budget")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name, head_name = name_of[id(emb.weight)], name_of[id(head.weight)]
    tied = emb_name == head_name
    outer = {t.name: t for t in targets if not t.module_name.startswith(prefix + ".")}
    n = windows.shape[0]
    n_tokens = n * max(1, windows.shape[1] - 1)
    path = lambda what, i: workdir / f"{what}-{i:05d}.safetensors"  # noqa: E731

    def save(what, i, tensors):
        save_file({f"w{w:05d}": t.contiguous() for w, t in enumerate(tensors)}, str(path(what, i)))

    def load(what, i):
        stored = load_file(str(path(what, i)))
        return [stored[f"w{w:05d}"] for w in range(len(stored))]

    def as_trainable(names):   # everywhere it is registered (a tied head is the embedding's Parameter)
        for name in names:
            p = model.get_parameter(name)
            _replace_everywhere(model, p, torch.nn.Parameter(p.data, requires_grad=True))

    def run_layer(i, h, kw):
        # with an input that requires grad, as in the resident backward pass (kernels may differ without)
        with torch.enable_grad():
            return _layer_output(layers[i](h.detach().requires_grad_(True), **kw)).detach()

    # forward: each layer's inputs, window by window (each window its own batch, as the resident run)
    materialize_parameters(model, [emb_name], weights)
    captured = capture_layer_inputs(model, layers[0], windows, 1)
    release(model)
    kwargs = [kw for _, kw in captured]
    hidden = [h for h, _ in captured]
    del captured
    for i in tqdm(range(len(layers)), desc="fisher forward", disable=not progress, unit="layer"):
        save("input", i, hidden)
        materialize(model, f"{prefix}.{i}", weights)
        hidden = [run_layer(i, h, kw) for h, kw in zip(hidden, kwargs)]
        release(model, f"{prefix}.{i}")
    # the head: each window's loss on labels sampled from the model, and its gradient
    materialize_parameters(model, [head_name, *(n for n in params if n.startswith(final_name + "."))], weights)
    head_target = outer.get(head_name)
    if head_target is not None:
        as_trainable([head_name])
    final, head = model.get_submodule(final_name), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    gen = torch.Generator().manual_seed(seed)
    grads, head_fisher = [], None
    with torch.enable_grad():
        for w, h in enumerate(hidden):
            h = h.detach().requires_grad_(True)
            logits = head(final(h))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            logp.gather(-1, y).sum().backward()
            grads.append(h.grad)
            if head_target is not None:
                g = head.weight.grad
                head.weight.grad = None
                if tied:   # the embedding's gradient adds to it before squaring: keep it until then
                    save_file({"g": g}, str(path("head-grad", w)))
                else:
                    head_fisher = torch.zeros_like(g) if head_fisher is None else head_fisher
                    head_fisher.addcmul_(g, g)
    del hidden
    if head_target is not None and not tied:
        consume(head_target, head.weight.detach(), head_fisher.div_(n_tokens))
        del head_fisher
    release(model)
    # backward, layer by layer in reverse
    by_layer: dict[int, list[WeightTarget]] = {}
    for t in targets:
        if t.name not in outer:
            by_layer.setdefault(int(t.module_name[len(prefix) + 1:].split(".")[0]), []).append(t)
    for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher backward", disable=not progress,
                  unit="layer"):
        materialize(model, f"{prefix}.{i}", weights)
        mine = by_layer.get(i, [])
        as_trainable([t.name for t in mine])
        fisher = {t.name: None for t in mine}

        def square_into(p, name):   # as each gradient is complete: its square added, the gradient freed
            fisher[name] = torch.zeros_like(p.grad) if fisher[name] is None else fisher[name]
            fisher[name].addcmul_(p.grad, p.grad)
            p.grad = None

        hooks = [t.parameter(model).register_post_accumulate_grad_hook(lambda p, name=t.name: square_into(p, name))
                 for t in mine]
        inputs = load("input", i)
        path("input", i).unlink()
        with torch.enable_grad():
            for w, (h, kw) in enumerate(zip(inputs, kwargs)):
                h.requires_grad_(True)
                _layer_output(layers[i](h, **kw)).backward(grads[w])
                grads[w] = h.grad
        for hook in hooks:
            hook.remove()
        del inputs
        for t in mine:
            p = t.parameter(model)
            F = fisher.pop(t.name)
            consume(t, p.detach(), (torch.zeros_like(p) if F is None else F).div_(n_tokens))
        release(model, f"{prefix}.{i}")
    emb_target = outer.get(emb_name)
    if emb_target is None:
        return
    # the embedding: its lookups' gradient (plus, for a tied head, the head's of the same window)
    materialize_parameters(model, [emb_name], weights)
    as_trainable([emb_name])
    fisher_emb = torch.zeros_like(model.get_input_embeddings().weight)
    with torch.enable_grad():
        for w in range(n):
            h, _ = run_to_first_layer(model, layers[0], windows[w: w + 1])
            h.backward(grads[w])
            g = model.get_input_embeddings().weight.grad
            model.get_input_embeddings().weight.grad = None
            if tied and head_target is not None:
                g = g + load_file(str(path("head-grad", w)))["g"]   # autograd's order: the head's first
                path("head-grad", w).unlink()
            fisher_emb.addcmul_(g, g)
    consume(emb_target, model.get_input_embeddings().weight.detach(), fisher_emb.div_(n_tokens))
    release(model)

