"""Interleaved in-process A/B of the LM head on the CPU: forward + backward of the same training batch of a recipe
(the first batch finsft's trainer draws), with the LM head on the supervised positions only (finsft's choice) and on
every position (TRL's choice off Triton devices), alternating the order from round to round; the same dropout seed for
both, so the losses must be equal. Prints CPU and wall seconds of each round and the ratios of the medians. Finer
grained than benchmarks/cpu_speed.py (no process start, no optimizer step), so steadier on a shared core.

usage: taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/lm_head_ab.py recipes/quickstart.json [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one untimed round first)")
    args = p.parse_args(argv)

    import torch

    from finsft.bench import prepare_bench_data
    from finsft.models import load_training_model, model_shape, resolve_model
    from finsft.plan import detect_hardware, get_sft_config, plan_run
    from finsft.quiet import quiet_libraries
    from finsft.recipe import load_recipe
    from finsft.training.trainer import build_trainer

    quiet_libraries()
    recipe = load_recipe(args.recipe)
    source = resolve_model(recipe)
    plan = plan_run(recipe, detect_hardware(), model_shape(source))
    with tempfile.TemporaryDirectory(prefix="finsft-ab-") as tmp:
        work = Path(tmp)
        data = prepare_bench_data(recipe, source, steps=1, warmup=0, random_weights=False, workdir=work, shared={},
                                  log=print)
        model = load_training_model(source, recipe, plan)
        trainer = build_trainer(recipe, model, get_sft_config(recipe, plan, str(work / "checkpoints")),
                                data.tokenizer, data.rows, supervised_lm_head=True)
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        times: dict[bool | None, list[tuple[float, float]]] = {True: [], None: []}
        losses: dict[bool | None, list[float]] = {True: [], None: []}
        for r in range(args.rounds + 1):
            for mode in (True, None) if r % 2 == 0 else (None, True):
                trainer.supervised_lm_head = mode
                torch.manual_seed(r)  # the same dropout masks for both
                c, t = time.process_time(), time.perf_counter()
                loss = trainer.compute_loss(trainer.model, dict(batch))
                loss.backward()
                trainer.model.zero_grad(set_to_none=True)
                if r:
                    times[mode].append((time.process_time() - c, time.perf_counter() - t))
                    losses[mode].append(float(loss.detach()))
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    print(f"batch: {batch['input_ids'].shape[0]} rows, {tokens} tokens, {supervised} supervised")
    for mode, name in ((None, "every position"), (True, "supervised only")):
        print(f"{name}: CPU s {[round(x[0], 2) for x in times[mode]]}, wall s {[round(x[1], 2) for x in times[mode]]}")
    cpu = statistics.median(x[0] for x in times[None]) / statistics.median(x[0] for x in times[True])
    wall = statistics.median(x[1] for x in times[None]) / statistics.median(x[1] for x in times[True])
    same = losses[None] == losses[True]
    print(f"every position / supervised only: {cpu:.2f}x CPU seconds, {wall:.2f}x wall seconds; losses "
          f"{'equal' if same else 'DIFFERENT'} ({losses[True][0]})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
