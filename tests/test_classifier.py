"""Chapter 6: labelled data, the classifier head and pooling, --trainable, and scripts/finetune_classifier.py
+ scripts/classify.py end to end on a tiny model and data the tests make."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from model import GPTConfig, GPTModel
from model.classifier import class_scores, load_classifier, predict, set_trainable, to_classifier
from model.finetune_data import balance, eot_id, prepare_classification, read_labelled, split_by_fractions
from model.lora import lora_layers
from model.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2)  # the GPT-2 vocabulary, for tiktoken's ids


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _sms(path: Path, n: int = 90, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append(f"spam\tWIN a FREE prize now! Call {rng.randint(100, 999)} to claim your cash")
        else:
            lines.append(f"ham\tsee you at {rng.randint(1, 12)} for {rng.choice(['dinner', 'lunch', 'tea'])}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def test_tab_and_csv_files_and_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "a.tsv").write_text("ham\thello there\n\nspam\tbuy now\nneutral\tmaybe\n", encoding="utf-8")
    ex = read_labelled(tmp_path / "a.tsv")
    assert [(e.label, e.text) for e in ex] == [("ham", "hello there"), ("spam", "buy now"), ("neutral", "maybe")]
    assert ex[1].where.endswith("a.tsv:3")
    (tmp_path / "b.csv").write_text('id,text,label\n1,"hi, you",ham\n2,win,spam\n', encoding="utf-8")
    ex = read_labelled(tmp_path / "b.csv")
    assert [(e.label, e.text) for e in ex] == [("ham", "hi, you"), ("spam", "win")]
    for name, body, message in [
        ("c.tsv", "ham\thi\nno tab here\n", r"c.tsv:2: expected 'label<TAB>text'"),
        ("d.tsv", "ham\thi\nspam\t  \n", r"d.tsv:2: empty text"),
        ("e.csv", "text,label\nhi,ham\nx,y,z\n", r"e.csv:3: 3 fields"),
        ("f.csv", "body,label\nhi,ham\n", r"f.csv:1: .*no column 'text'"),
        ("g.tsv", "ham\thi\nham\tho\n", "a classifier needs 2 or more"),
    ]:
        (tmp_path / name).write_text(body, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_labelled(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_labelled(tmp_path / "nowhere.tsv")


def test_balance_split_and_padding(tmp_path):
    ex = read_labelled(_sms(tmp_path / "sms.txt", n=90))  # 30 spam, 60 ham
    bal = balance(ex, seed=1)
    assert sorted(e.label for e in bal).count("ham") == 30 == sorted(e.label for e in bal).count("spam")
    assert balance(ex, seed=1) == bal and balance(ex, seed=2) != bal  # seeded
    parts = split_by_fractions(list(range(60)), (0.7, 0.1, 0.2), seed=3)
    assert [len(p) for p in parts] == [42, 6, 12] and sorted(sum(parts, [])) == list(range(60))
    train, val, test = prepare_classification(tmp_path / "sms.txt", seed=3, context_length=32)
    assert (len(train), len(val), len(test)) == (42, 6, 12) and train.labels == ["ham", "spam"]
    L = train.max_length
    assert train.x.shape == (42, L) and val.x.shape[1] == L  # every split padded to the longest training text
    short = int(train.lengths.argmin())
    assert (train.x[short, train.lengths[short]:] == eot_id()).all()  # padded with <|endoftext|>
    cut = prepare_classification(tmp_path / "sms.txt", seed=3, context_length=32, max_length=4)[0]
    assert cut.x.shape[1] == 4 and int(cut.lengths.max()) == 4
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        prepare_classification(tmp_path / "sms.txt", seed=3, context_length=32, max_length=64)


# ----------------------------------------------------------------------------------------------
# Head, pooling, trainable
# ----------------------------------------------------------------------------------------------
def test_last_real_pooling_ignores_padding_and_last_reads_the_pad():
    torch.manual_seed(0)
    model = to_classifier(GPTModel(TINY), 3).eval()
    assert model.out_head.out_features == 3 and model.out_head.bias is not None
    text = torch.randint(0, 50000, (1, 5))
    padded = torch.cat([text, torch.full((1, 4), eot_id())], 1)  # (1, 9)
    alone = class_scores(model, text, torch.tensor([5]), "last-real")
    torch.testing.assert_close(class_scores(model, padded, torch.tensor([5]), "last-real"), alone)
    assert not torch.allclose(class_scores(model, padded, torch.tensor([5]), "last"), alone)


@pytest.mark.parametrize("trainable", ["last-block", "all", "head", "lora"])
def test_trainable_sets_exactly_what_learns(trainable):
    torch.manual_seed(0)
    model = to_classifier(GPTModel(TINY), 2)
    set_trainable(model, trainable, lora_rank=2 if trainable == "lora" else None)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable == "all":
        assert names == {n for n, _ in model.named_parameters()}
    elif trainable == "head":
        assert names == {"out_head.weight", "out_head.bias"}
    elif trainable == "last-block":
        assert names == {n for n, _ in model.named_parameters()
                         if n.startswith(("blocks.1.", "final_norm.", "out_head."))}
    else:
        assert names and all(n.endswith((".A", ".B")) for n in names) and "out_head" in lora_layers(model)
    x = torch.randint(0, 50000, (2, 6))
    torch.nn.functional.cross_entropy(class_scores(model, x, torch.tensor([6, 3]), "last-real"),
                                      torch.tensor([0, 1])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    with pytest.raises(ValueError, match="needs --lora-rank"):
        set_trainable(to_classifier(GPTModel(TINY), 2), "lora")


# ----------------------------------------------------------------------------------------------
# The scripts, end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_pretrained(GPTModel(TINY), d / "hf")
    return d


@pytest.mark.slow
def test_finetune_classifier_and_classify_end_to_end(base, tmp_path, capsys):
    data = _sms(tmp_path / "sms.txt", n=120)
    main = _script("finetune_classifier")
    out = tmp_path / "run"
    args = ["--data", str(data), "--init-from", str(base / "hf"), "--out", str(out), "--epochs", "3",
            "--lr", "2e-3", "--trainable", "all", "--no-progress", "--batch-size", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test" in printed and "accuracy" in printed
    m = json.loads((out / "metrics.json").read_text())
    for k in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    assert m["test_accuracy"] >= 0.9  # the toy task is easy: it must be learned
    assert m["confusion"]["test"] and sum(map(sum, m["confusion"]["test"])) == m["n_examples"]["test"]
    for f in ("accuracy.png", "loss.png", "classifier.json", "classifier.safetensors", "checkpoint.pt"):
        assert (out / f).is_file(), f
    model, meta = load_classifier(out)
    (label, p), (label2, _) = predict(model, meta, ["WIN a FREE prize now! Call 555 to claim your cash",
                                                     "see you at 3 for tea"])
    assert (label, label2) == ("spam", "ham") and 0.5 < p <= 1.0
    classify = _script("classify")
    assert classify(["--checkpoint", str(out), "--text", "see you at 3 for tea"]) == 0
    assert capsys.readouterr().out.startswith("ham\t")
    with pytest.raises(ValueError, match="already holds a run"):
        main(args)  # a second run into the same --out is refused (exit 2 through model.cli.run)


def test_cli_refusals_are_one_line(base, tmp_path, capsys):
    from model.cli import run

    main = _script("finetune_classifier")
    data = _sms(tmp_path / "sms.txt")
    for extra, message in [
        (["--data", str(tmp_path / "none.txt")], "no data file"),
        (["--data", str(data), "--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
        (["--data", str(data), "--init-from", str(tmp_path)], "holds neither"),
        (["--data", str(data), "--max-length", "64"], "exceeds the model's context length"),
    ]:
        with pytest.raises(SystemExit) as e:
            run(main, extra + ["--init-from", str(base / "hf")] if "--init-from" not in extra else extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    classify = _script("classify")
    with pytest.raises(SystemExit) as e:
        run(classify, ["--checkpoint", str(tmp_path), "--text", "hi"])
    assert e.value.code == 2 and "not a fine-tuned classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_classifier_trains_the_adapters_alone_and_saves_them(base, tmp_path):
    main = _script("finetune_classifier")
    out = tmp_path / "lora"
    assert main(["--data", str(_sms(tmp_path / "sms.txt", n=30)), "--init-from", str(base / "hf"), "--out", str(out),
                 "--steps", "2", "--lora-rank", "2", "--no-progress", "--batch-size", "4", "--eval-every", "0",
                 "--eval-batches", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["trainable"] == "lora" and (out / "adapters.safetensors").is_file()
    with torch.device("meta"):
        want = set_trainable(to_classifier(GPTModel(TINY), 2), "lora", lora_rank=2)
    assert m["trainable_parameters"] == sum(p.numel() for p in want.parameters() if p.requires_grad)


@pytest.mark.slow
def test_fused_classifier_job_gives_the_pytorch_losses(tmp_path):
    """A few engine steps of the classification job with LoRA (the head's adapter included): the
    fused path gives the PyTorch path's losses and accuracies."""
    from model.classifier import ClassifierJob
    from model.engine import RunConfig, fit, prepare

    train, val, test = prepare_classification(_sms(tmp_path / "sms.txt", n=36), seed=1, context_length=32)
    cfg = GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1)
    results = {}
    for fused in (False, True):
        job = ClassifierJob(train, val, test, pooling="last-real", batch_size=4, eval_batches=1, source="sms",
                            settings={"data": "sms", "balance": True, "max_length": None, "label_column": "label",
                                      "text_column": "text"})
        rc = RunConfig(steps=3, batch_size=4, eval_every=0, eval_batches=1, lr=1e-2, out=str(tmp_path / str(fused)),
                       progress=False, device="cpu")
        torch.manual_seed(0)
        model = set_trainable(to_classifier(GPTModel(cfg, fused=fused), 2), "lora", lora_rank=2)
        rows = fit(prepare(rc, job), job, model)["rows"]
        results[fused] = torch.tensor([r["train_loss"] for r in rows] + [rows[-1]["val_loss"], rows[-1]["val_accuracy"]])
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-5)


def test_real_sms_file_reads_and_balances(shared_data):
    path = shared_data / "SMSSpamCollection"
    if not path.is_file():
        pytest.skip("no SMSSpamCollection")
    train, val, test = prepare_classification(path, seed=123, context_length=1024)
    assert train.labels == ["ham", "spam"]
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's 747 + 747, split 70/10/20
