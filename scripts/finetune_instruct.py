"""Fine-tune the GPT to follow instructions (the book's chapter 7): `python scripts/finetune_instruct.py --help`.

    python scripts/finetune_instruct.py --data ../shared/data/instruction-data.json --init-from runs/tiny --out runs/instruct
    python scripts/finetune_instruct.py ... --lora-rank 16 --lora-alpha 16     # appendix E: adapters only
    python scripts/finetune_instruct.py ... --judge-url http://localhost:11434/api/chat   # score with Llama 3
    python scripts/ask.py --checkpoint runs/instruct --instruction "Rewrite the sentence in passive voice." \\
        --input "The chef cooks the meal."

Data: a JSON list of {"instruction", "input", "output"}, split 85/10/5 into train/test/validation
with --seed (the book's 935/110/55 of its 1,100 entries), each entry shown in the book's Alpaca
prompt. Collation as the book's: <|endoftext|> appended and used as padding, every padding target
but the first ignored; --mask-prompt ignores the prompt's targets too; --max-length cuts.

After training, each test entry's response is generated (greedy, KV cache, stops at <|endoftext|>,
at most --max-new-tokens) and written with the entry to instruction-data-with-response.json;
metrics.json holds train/val/test loss (and the judge's mean score with --judge-url); the model
is saved as config.json + model.safetensors (adapters merged; adapters.safetensors alone with LoRA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.cli import run, terminate_as_exception  # noqa: E402
from model.engine import HelpFormatter, RunConfig, add_run_arguments, fit  # noqa: E402
from model.finetune import add_model_arguments, check_model_arguments, load_base, plan_finetune  # noqa: E402
from model.finetune_data import read_instructions, split_instructions  # noqa: E402
from model.instruct import MAX_NEW_TOKENS, InstructJob, generate_responses  # noqa: E402
from model.judge import DEFAULT_JUDGE_MODEL, JudgeUnavailable, score_responses  # noqa: E402
from model.lora import ADAPTERS_NAME, apply_lora, lora_layers, merge_lora, save_adapters  # noqa: E402
from model.weights import save_pretrained  # noqa: E402

METRICS_JSON, RESPONSES_JSON = "metrics.json", "instruction-data-with-response.json"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finetune_instruct.py", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    add_model_arguments(ap, lora_help=" and train only the adapters (default: train every weight, as the book)")
    g = ap.add_argument_group("instructions")
    g.add_argument("--data", required=True, help="JSON list of {instruction, input, output}")
    g.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt's tokens (the book's exercise 7.2)")
    g.add_argument("--max-length", type=int, help="cut sequences at this many tokens (default: the context length)")
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="longest generated response")
    g.add_argument("--no-responses", dest="responses", action="store_false",
                   help="skip generating the test entries' responses after training")
    g.add_argument("--judge-url", help="Ollama chat API that scores the responses, e.g. http://localhost:11434/api/chat")
    g.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL, help="the judge's model name")
    add_run_arguments(ap, lr=5e-5, batch_size=8, eval_every=5, eval_batches=5, out="runs/instruct",
                      steps_help="optimizer steps (default: 2 epochs, the book's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    terminate_as_exception()
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    check_model_arguments(args)
    for name in ("max_length", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps is None and args.epochs is None:
        args.epochs = 2  # the book's
    rc = RunConfig.from_args(args)
    rc.check()

    model, note = load_base(args.init_from, args.model, dropout=args.dropout, fused=args.fused, seed=rc.seed)
    train, test, val = split_instructions(read_instructions(args.data), seed=rc.seed)
    settings = {"data": args.data, "init_from": args.init_from, "mask_prompt": args.mask_prompt,
                "max_length": args.max_length, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    job = InstructJob(train, val, test, context_length=model.cfg.context_length, max_length=args.max_length,
                      mask_prompt=args.mask_prompt, batch_size=rc.batch_size, eval_batches=rc.eval_batches,
                      source=args.data, settings=settings)
    if args.lora_rank:
        apply_lora(model, args.lora_rank, args.lora_alpha or args.lora_rank)
    plan, n_trainable = plan_finetune(rc, job, model, note=note, default_out="runs/instruct",
                                      trainable=f"LoRA rank {args.lora_rank}" if args.lora_rank else "all")

    result = fit(plan, job, model)
    model, out = result["model"], plan.out
    if not plan.dist.main:
        return 0
    model.eval()
    metrics = {f"{split}_loss": job.split_loss(model, split, plan.device) for split in ("train", "val", "test")}
    print(f"loss: train {metrics['train_loss']:.3f}, validation {metrics['val_loss']:.3f}, test {metrics['test_loss']:.3f}")
    if lora_layers(model):
        save_adapters(model, out / ADAPTERS_NAME)
        merge_lora(model)
    save_pretrained(model, out)
    wrote = [out / METRICS_JSON]
    if args.responses:
        responses = generate_responses(model, test, max_new_tokens=args.max_new_tokens, progress=rc.progress)
        entries = [{**entry, "model_response": r} for entry, r in zip(test, responses)]
        (out / RESPONSES_JSON).write_text(json.dumps(entries, indent=4) + "\n", encoding="utf-8")
        wrote.append(out / RESPONSES_JSON)
        print(f"response to test entry 0 ({test[0]['instruction'][:60]!r}): {responses[0][:200]!r}")
        if args.judge_url:
            try:
                judged = score_responses(entries, args.judge_url, args.judge_model, progress=rc.progress)
            except JudgeUnavailable as e:
                print(f"warning: {e}; the run's other results are kept", file=sys.stderr)
                metrics["judge_error"] = str(e)
            else:
                metrics.update(judge_model=args.judge_model, mean_score=judged["mean_score"],
                               n_scored=judged["n_scored"], scores=judged["scores"])
                print(f"judge {args.judge_model}: mean score {judged['mean_score']} over {judged['n_scored']} "
                      f"of {len(entries)} responses")
    metrics.update(n_entries={"train": len(train), "val": len(val), "test": len(test)},
                   trainable_parameters=n_trainable, steps=result["step"], seconds=round(time.perf_counter() - t0, 1))
    (out / METRICS_JSON).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {', '.join(map(str, wrote))}, the model in {out} "
          f"(python scripts/ask.py --checkpoint {out} --instruction ...)")
    return 0


if __name__ == "__main__":
    run(main)
