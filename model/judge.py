"""Scoring instruction responses with a larger model as the judge, as the book's chapter 7 does.

The book asks Llama 3 (8B), served locally by Ollama, to score each response from 0 to 100 against
the reference output, and reports the mean. This client speaks Ollama's REST chat API:

    POST {url}  (e.g. http://localhost:11434/api/chat)
    {"model": "llama3", "messages": [{"role": "user", "content": PROMPT}], "stream": false,
     "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    -> {"message": {"role": "assistant", "content": "85"}, "done": true}

(a streamed answer, one JSON object per line, is read too). Nothing answering at the URL raises
`JudgeUnavailable` with what to do; a reply that holds no score counts as unscored, not as 0.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from model.finetune_data import format_input

DEFAULT_JUDGE_MODEL = "llama3"


class JudgeUnavailable(RuntimeError):
    """Nothing (or something that is not an Ollama chat API) answers at the judge's URL."""


def judge_prompt(entry: dict, response: str) -> str:
    """The book's scoring prompt for one entry and the model's response."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{response}`"
            " on a scale from 0 to 100, where 100 is the best score. "
            "Respond with the integer number only.")


def query(prompt: str, url: str, model: str = DEFAULT_JUDGE_MODEL, timeout: float = 120.0) -> str:
    """The judge's reply to one user message."""
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},  # the book's: reproducible scores
    }).encode("utf-8")
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise JudgeUnavailable(f"the judge at {url} answered HTTP {e.code} ({e.reason}); is model "
                               f"{model!r} pulled (`ollama pull {model}`)?") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise JudgeUnavailable(f"no judge answers at {url} ({reason}); start one (`ollama serve`, then "
                               f"`ollama pull {model}`) or leave out --judge-url") from e
    content = []
    for line in text.splitlines():  # one object, or a stream of them (one per line)
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            raise JudgeUnavailable(f"the judge at {url} did not answer in Ollama's JSON: {line[:80]!r}") from e
        content.append(msg.get("message", {}).get("content", ""))
    return "".join(content)


def parse_score(reply: str) -> int | None:
    """The first integer in 0..100 of the reply, or None."""
    for m in re.finditer(r"\d+", reply):
        if 0 <= int(m.group()) <= 100:
            return int(m.group())
    return None


def score_responses(entries: list[dict], url: str, model: str = DEFAULT_JUDGE_MODEL,
                    response_key: str = "model_response", timeout: float = 120.0, progress: bool = False) -> dict:
    """Score every entry's response; {"scores": [int | None], "mean_score", "n_scored"}."""
    from tqdm.auto import tqdm

    scores = []
    for entry in tqdm(entries, desc="judge", disable=not progress):
        scores.append(parse_score(query(judge_prompt(entry, entry[response_key]), url, model, timeout)))
    valid = [s for s in scores if s is not None]
    return {"scores": scores, "mean_score": sum(valid) / len(valid) if valid else None, "n_scored": len(valid)}
