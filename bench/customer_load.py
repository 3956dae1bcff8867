"""Customers at once: N customers open the link of a published assistant and ask Q questions each, all at the same
time, against `tunebot run` polling the Bot API emulator on loopback. Every reply is read back from the emulator,
with the emulator's own timestamps (question stored -> first words shown, as a draft or a message; -> the final
message), so the poll interval of this script does not count.

Prints JSON (and writes bench/results/customer_load.json): replies lost or duplicated, error replies, how many
answers said "passed to the team" and how many of those are queued for the experts with their customer, and the
p50/p95 times. Bounded: a question with no reply after --timeout-s counts as lost.

    python bench/customer_load.py                          # 50 customers x 10 questions, the bundled model (llama.cpp)
    python bench/customer_load.py --model fake             # a loopback OpenAI-compatible server instead of a model
    python bench/customer_load.py --customers 5 --questions 3 --model fake   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
CACHE = Path(os.environ.get("TUNEBOT_TEST_CACHE", ROOT / ".cache" / "test-models"))
FIRST_ID = 600_000
PLACEHOLDER = "…"


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "examples" / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def question_plan(customers: int, questions: int, *, seed: int = 0) -> dict[int, list[str]]:
    """Each customer's questions, all different, in a random order: about 70% rewordings of FAQ questions (in
    scope), 15% questions the FAQ lacks, 15% words that mean nothing (which the assistant does not know even
    before any training calibrated its "I don't know")."""
    rng = random.Random(seed)
    inside = [q["question"] for q in _lines("acme_eval.jsonl")]
    outside = [q["question"] for q in _lines("acme_out_of_scope.jsonl")]
    plan = {}
    for i in range(customers):
        n_out = min(len(outside), round(questions * 0.15))
        n_none = round(questions * 0.15)
        n_in = min(len(inside), questions - n_out - n_none)
        nonsense = ["".join(rng.choice("zqxjvkwbp") for _ in range(5)) + " " +
                    "".join(rng.choice("zqxjvkwbp") for _ in range(4)) + "?" for _ in range(n_none)]
        chosen = rng.sample(inside, n_in) + rng.sample(outside, n_out) + nonsense
        rng.shuffle(chosen)
        plan[FIRST_ID + i] = chosen
    return plan


class Watcher:
    """One thread reads the emulator's history and drafts; customers wait on it for their chat's next message."""

    def __init__(self, emu, poll_s: float = 0.2):
        self.emu, self.poll_s = emu, poll_s
        self.history: list[dict] = []
        self.drafts: list[dict] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            history, drafts = self.emu.history(), self.emu.drafts()
            with self.changed:
                self.history, self.drafts = history, drafts
                self.changed.notify_all()
            time.sleep(self.poll_s)

    def bot_messages(self, chat_id: int) -> list[dict]:
        return [i for i in self.history if str((i.get("message") or {}).get("chat_id")) == str(chat_id)]

    def wait_for(self, chat_id: int, count: int, deadline: float) -> bool:
        """Whether the chat has `count` bot messages before the deadline."""
        with self.changed:
            while len(self.bot_messages(chat_id)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(timeout=min(left, 1.0))
        return True


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def spread(values: list[float]) -> dict:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "max": percentile(values, 1.0)}


def run(*, customers: int, questions: int, model: str, timeout_s: float, max_new_tokens: int,
        workdir: Path) -> dict:
    from bot_process import BotProcess
    from emulator import Emulator
    from fake_openai import FakeOpenAI, nearest_answer

    from storage import Store, open_db
    from bot.telegram.texts import t

    store = Store(open_db(workdir / "tunebot.db"))
    acme = store.create_assistant("acme", system_prompt="You answer for ACME Parcel.", owner_id=1)
    for pair in _lines("acme_faq.jsonl"):
        store.add_example(acme.id, pair["question"], pair["answer"], status="approved")
    token = store.publish(acme.id).token
    if CACHE.exists():  # the dequantized weights and converted adapters, made once
        (workdir / "models").symlink_to(CACHE.resolve(), target_is_directory=True)
    env = {"TUNEBOT_MAX_NEW_TOKENS": str(max_new_tokens), "TUNEBOT_TORCH_THREADS": "1",
           "TUNEBOT_CUSTOMER_PER_MINUTE": "100000", "TUNEBOT_CUSTOMER_PER_DAY": "100000",
           "TUNEBOT_UNANSWERED_NOTIFY_MINUTES": "0", "TUNEBOT_EMBEDDING_MODEL": ""}
    fake = None
    if model == "fake":
        fake = FakeOpenAI(default=nearest_answer).__enter__()
        env.update(TUNEBOT_INFERENCE_BACKEND="openai", TUNEBOT_INFERENCE_BASE_URL=fake.base_url,
                   TUNEBOT_BASE_MODEL="fake-model")
    else:
        env.update(TUNEBOT_INFERENCE_BACKEND="llamacpp", TUNEBOT_BASE_MODEL="bundled:smollm2-135m",
                   TUNEBOT_PRELOAD_MODELS="1")
    emu = Emulator()
    bot = BotProcess(emu, workdir, **env).start()
    abstain = t("en", "customer_abstain")
    plan = question_plan(customers, questions)
    watcher = Watcher(emu)
    asked: dict[int, list[str]] = {uid: [] for uid in plan}
    lost = []
    try:
        # one question first, not counted: the model loaded and the index built, as on a bot that has run a while
        warm = emu.user(FIRST_ID - 1, "Warm-up")
        warm.send(f"/start {token}")
        watcher.wait_for(warm.id, 1, time.monotonic() + timeout_s)
        warm.send(_lines("acme_faq.jsonl")[0]["question"])
        watcher.wait_for(warm.id, 2, time.monotonic() + timeout_s)
        started = time.monotonic()
        barrier = threading.Barrier(len(plan))

        def customer(uid: int) -> None:
            user = emu.user(uid, f"C{uid}")
            user.send(f"/start {token}")
            if not watcher.wait_for(uid, 1, time.monotonic() + timeout_s):
                lost.append((uid, "/start"))
                return
            barrier.wait()
            for n, question in enumerate(plan[uid], start=2):
                user.send(question)
                asked[uid].append(question)
                if not watcher.wait_for(uid, n, time.monotonic() + timeout_s):
                    lost.append((uid, question))
                    return

        threads = [threading.Thread(target=customer, args=(uid,)) for uid in plan]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall_s = time.monotonic() - started
        time.sleep(1.0)  # a duplicate would arrive after the reply it repeats
        history, drafts = emu.history(), emu.drafts()
    finally:
        watcher.stop.set()
        bot.stop()
        emu.close()
        if fake is not None:
            fake.__exit__(None, None, None)
    log = bot.log_path.read_text()
    sign_ms, first_ms, final_ms, answered, abstained, duplicated, errors = [], [], [], 0, 0, 0, 0
    for uid, questions_asked in asked.items():
        sent = [i for i in history if (i.get("message") or {}).get("from", {}).get("id") == uid]
        replies = sorted((i for i in history if str((i.get("message") or {}).get("chat_id")) == str(uid)),
                         key=lambda i: i["time"])[1:]  # after the welcome
        all_drafts = [d for d in drafts if d["chat_id"] == uid]
        chat_drafts = [d for d in all_drafts if d["text"].strip() not in ("", PLACEHOLDER)]
        duplicated += max(0, len(replies) - len(questions_asked))
        for k, question in enumerate(questions_asked):
            asked_at = next((i["time"] for i in sent if i["message"].get("text") == question), None)
            if asked_at is None or k >= len(replies):
                continue
            reply = replies[k]
            text = reply["message"].get("text") or ""
            errors += "Reference" in text or "⚠️" in text
            abstained += text == abstain
            answered += text != abstain
            final_ms.append(reply["time"] - asked_at)
            shown = [d["time"] for d in chat_drafts if asked_at <= d["time"] <= reply["time"]]
            first_ms.append(min(shown + [reply["time"]]) - asked_at)
            signs = [d["time"] for d in all_drafts if asked_at <= d["time"] <= reply["time"]]
            sign_ms.append(min(signs + [reply["time"]]) - asked_at)
    queued = Store(open_db(workdir / "tunebot.db")).db.execute(
        "select count(*) from unanswered u join customers c on c.id = u.customer_id where u.assistant_id = ? "
        "and c.user_id != ?", [acme.id, FIRST_ID - 1]).fetchone()[0]
    return {
        "model": model, "customers": customers, "questions_per_customer": questions,
        "questions": sum(len(v) for v in asked.values()), "replies": len(final_ms), "answered": answered,
        "passed_to_team": abstained, "queued_for_experts": queued, "lost": len(lost), "duplicated": duplicated,
        "error_replies": errors, "tracebacks_in_log": log.count("Traceback"),
        "placeholder_ms": spread(sign_ms), "first_reply_ms": spread(first_ms), "final_reply_ms": spread(final_ms),
        "mean_final_reply_ms": round(statistics.fmean(final_ms), 1) if final_ms else None,
        "wall_s": round(wall_s, 1), "max_new_tokens": max_new_tokens,
        "note": "times from the emulator's clock, from the question stored to: the '…' draft (placeholder), the "
                "first words (a draft or the message: first_reply), the final message",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--questions", type=int, default=10, help="per customer, asked one after another")
    parser.add_argument("--model", choices=("bundled", "fake"), default="bundled")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--timeout-s", type=float, default=600, help="per reply; none by then: lost")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "customer_load.json"),
                        help="where to write the JSON ('' for nowhere)")
    args = parser.parse_args(argv)
    if args.customers < 1 or args.questions < 1:
        parser.error("--customers and --questions must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(customers=args.customers, questions=args.questions, model=args.model,
                     timeout_s=args.timeout_s, max_new_tokens=args.max_new_tokens, workdir=Path(tmp))
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 and result["error_replies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
