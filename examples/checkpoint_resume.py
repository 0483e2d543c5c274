"""Save a model with its optimizer's state, load both, and resume training exactly.

``model.save(path, optimizer=opt)`` writes the parameters and the optimizer's state
(moments, momentum buffers, step count, hyperparameters) into one ``.npz``;
``cupynn.load(path)`` rebuilds the model and ``opt.load_state_dict(
cupynn.optim.load_state(path))`` the optimizer. Training on from there gives the same
parameters, bit for bit, as never stopping.

    python examples/checkpoint_resume.py            # 400 + 400 SGD-with-momentum steps
    python examples/checkpoint_resume.py --quick    # 20 + 20 (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import cupynn


def train(model, opt, x, y, steps):
    for _ in range(steps):
        loss, grads = cupynn.value_and_grad(model, x, "mse", target=y)
        opt.step(grads)
    return float(loss)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="20 + 20 steps (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    half = 20 if args.quick else 400

    model = cupynn.MLP([1, 48, 48, 1], "silu", device=args.device, rng=0)
    xp = np
    if model.device == "cuda":
        import cupy as xp
    x = xp.linspace(-2, 2, 512).reshape(-1, 1)
    y = xp.abs(x) - 1.0

    def new_opt(m):
        return cupynn.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, nesterov=True)

    # one run straight through
    straight = cupynn.MLP([1, 48, 48, 1], "silu", device=args.device, rng=0)
    opt = new_opt(straight)
    train(straight, opt, x, y, 2 * half)

    # the same run, saved half way and resumed from the file
    opt = new_opt(model)
    loss = train(model, opt, x, y, half)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.npz")
        model.save(path, optimizer=opt)
        print(f"saved after {opt.step_count} steps (mse {loss:.3e}) to {os.path.basename(path)}")
        resumed = cupynn.load(path, device=args.device)
        opt2 = new_opt(resumed)
        opt2.load_state_dict(cupynn.optim.load_state(path))
    loss = train(resumed, opt2, x, y, half)
    print(f"resumed and trained to step {opt2.step_count}: mse {loss:.3e}")
    same = np.array_equal(cupynn.get_flat(resumed), cupynn.get_flat(straight))
    print("identical to the uninterrupted run:", same)
    assert same


if __name__ == "__main__":
    main()
