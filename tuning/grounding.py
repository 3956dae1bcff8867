"""Grounded answers: retrieved examples in the prompt (at training and at answer time alike), and the
confidence below which the assistant says it does not know.

Training rows follow RAFT: each question is shown with k retrieved examples, the gold one (its own fact)
at a random position among distractors, and in a share of rows only distractors. The target starts with a
citation: `[i] answer` names the example the answer comes from, and `[0] I don't know.` is the target of the
distractor-only rows. Measured on invented facts (bench/learning_sweep.py): with the true answer as the
target of those rows (RAFT's choice, "learn the facts themselves") the 135M model learned to make up an
answer for any entity (out-of-scope questions got confident invented facts), and the facts themselves are
taught by the closed-book rows anyway. The citation gives three things at answer time: the source an answer
drew on, a confidence (the probability of the cited number, a choice among k + 1), and an abstention the
model learned from data.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tuning.retrieval import Doc, Hit, Retriever, has_cyrillic
from tuning.scoring import token_f1

GROUNDING_FILE = "grounding.json"  # written beside a trained adapter: recipe, k, calibrated threshold
DEFAULT_K = 3
NO_ANSWER = "I don't know."  # what the model says after [0]; the service shows the user's own text instead
GOLD_SHARE = 0.8  # rows whose context holds the gold example; the rest see distractors only
NO_ANSWER_RANGE = (0.2, 0.9)  # where the calibrated P([0]) threshold may fall (few validation questions)
DEFAULT_NO_ANSWER = 0.5  # with nothing to calibrate on: "I don't know" when [0] is the likelier half
KS_C = 1.36  # the best threshold's Youden's J is the two-sample Kolmogorov-Smirnov statistic: below its 5% critical
#   value (1.36 * sqrt((n + m) / (n m))) P([0]) does not tell answerable from unanswerable (an untrained or random
#   model, a handful of validation questions): then only a nearly certain [0] is "I don't know"
MIN_SEPARATION = 0.2
OTHER_EXAMPLE_SHARE = 0.8  # the model must be this sure of another example to answer from it instead of the first
#   (with the embedder; chosen on ACME and ACME asked in Russian by bench/answer_rules.py: 0.8 and "never" tied,
#   0.7 lost 3-8 points; with n-gram retrieval 0.7 had been best)
SNAP_F1 = 0.6  # a generated answer this close to the cited example is that example's answer
LEFT_OUT_QUANTILE = 0.7  # "I don't know" for questions less similar than this share of validation questions
#   whose fact was left out of the index (chosen on ACME and invented FAQs: at 0.7 their held-out out-of-scope
#   questions were withheld 80-95%; bench/retrieval_quality.py)
MARGIN = 0.5  # with no left-out scores: half the lowest in-scope confidence
DEFAULT_THRESHOLD = 0.03  # n-grams with no calibration (no validation split): only questions sharing almost nothing
DEFAULT_HYBRID_THRESHOLD = 0.6  # with the embedder, before any calibration: below the median left-out question
#   of the tuning sets (0.63-0.66), so only clearly unrelated questions
CROSS_LINGUAL_OFFSET = 0.02  # chosen on Russian questions to ACME's English FAQ (examples/acme_ru_*.jsonl): their
#   out-of-scope questions' similarities sit this far below the English left-out ones at the quantile
NEVER = 2.0  # a P([0]) threshold no probability reaches: the model's own "I don't know" is not used


def render_question(question: str, hits: Sequence[Hit | Doc]) -> str:
    """The user turn of a grounded prompt: the reference examples, then the question. (Measured on ACME: the
    examples' answers alone, without their questions, made the citation a worse choice among them, 15% vs 28%
    right when forced to cite, and P([0]) stopped telling answerable from unanswerable.)"""
    if not hits:
        return question
    refs = "\n".join(f"[{i}] Q: {h.question}\nA: {h.answer}" for i, h in enumerate(hits, 1))
    return f"Reference examples:\n{refs}\n\nQuestion: {question}"


def training_context(question: str, group: str, retriever: Retriever, rng: random.Random, *,
                     k: int = DEFAULT_K, gold_share: float = GOLD_SHARE) -> list[Hit]:
    """k examples for a training row: the nearest ones of other facts, and the nearest other wording of its own
    fact (the one retrieval would find for a reworded question) at a random position, or, in 1 - gold_share of
    rows, distractors only."""
    distractors = retriever.search(question, k, exclude=lambda d: d.group == group)
    context = list(distractors)
    if rng.random() < gold_share:
        gold = (retriever.search(question, 1, exclude=lambda d: d.group != group or d.question == question)
                or retriever.search(question, 1, exclude=lambda d: d.group != group))
        context = context[:k - 1]
        if gold:
            context.insert(rng.randrange(len(context) + 1), gold[0])
    else:
        rng.shuffle(context)
    return context


def training_index(items) -> Retriever:
    """The retriever over a run's training items (every wording of every fact), as answering will use it."""
    return Retriever(Doc(key=str(i.example_id) if i.example_id is not None else f"t{n}", question=i.question,
                         answer=i.answer, group=i.group) for n, i in enumerate(items))


def cited(answer: str, position: int) -> str:
    """A grounded training target: the number of the example it comes from, then the answer ([0]: none)."""
    return f"[{position}] {answer if position else NO_ANSWER}"


def grounded_items(train, val, retriever: Retriever, *, k: int = DEFAULT_K, seed: int = 0,
                   gold_share: float = GOLD_SHARE, closed_book: bool = True):
    """(train, val) TrainItems whose questions carry their retrieved context and whose answers cite the example
    they come from; plus, with closed_book, every fact once more without context, answered plainly (so the
    same adapter also answers closed book)."""
    rng = random.Random(seed)

    def grounded(item, share: float):
        return ground_item(item, retriever, rng, k=k, gold_share=share)

    out_train = [grounded(i, gold_share) for i in train]
    if closed_book:
        out_train += [i for i in train if not i.variation]
    out_val = [grounded(i, 1.0) for i in val]  # validation asks what answering does: the gold is findable
    return out_train, out_val


def ground_item(item, retriever: Retriever, rng: random.Random, *, k: int, gold_share: float):
    """One TrainItem as a grounded row: its question with k retrieved examples, its answer citing its fact's."""
    from dataclasses import replace

    hits = training_context(item.question, item.group, retriever, rng, k=k, gold_share=gold_share)
    position = next((n for n, h in enumerate(hits, 1) if h.group == item.group), 0)
    return replace(item, question=render_question(item.question, hits), answer=cited(item.answer, position))


def unanswerable_items(val, retriever: Retriever, *, k: int = DEFAULT_K, seed: int = 1):
    """Validation questions shown only other facts' examples (the answer "[0] I don't know."): the negatives
    the "I don't know" threshold is calibrated on, beside the same questions shown their own fact."""
    rng = random.Random(seed)
    return [ground_item(item, retriever, rng, k=k, gold_share=0.0) for item in val]


_CITATION = re.compile(r"^\s*\[(\d{1,2})\]\s*")


@dataclass(frozen=True)
class GroundedAnswer:
    """A grounded model's output read back: the answer text, the example it cites (None: none), whether it
    said it does not know, how sure it was of that choice (0..1), and the probability it gave [0]."""

    text: str
    cited: int | None
    abstained: bool
    choice_probability: float | None
    no_answer_probability: float | None = None
    choice: dict | None = None  # {number: probability} of the citation, when the engine reported it


def citation_choice(alternatives: Sequence[Sequence[tuple[str, float]]], k: int) -> dict[int, float] | None:
    """{number: probability} over the citations [0]..[k], read from the engine's top alternatives at the step
    where the model wrote the number (the first step whose likeliest token is a number); None when there is
    none (no citation, or an engine that does not report alternatives)."""
    for step in alternatives:
        if not step or not step[0][0].strip().isdigit():
            continue
        mass = {d: 0.0 for d in range(k + 1)}
        for text, logprob in step:
            text = text.strip()
            if text.isdigit() and int(text) in mass:
                mass[int(text)] += math.exp(logprob)
        total = sum(mass.values())
        return {d: p / total for d, p in mass.items()} if total > 0 else None
    return None


def decide_citation(choice: dict[int, float], no_answer_above: float, *, share: float = OTHER_EXAMPLE_SHARE) -> int:
    """The example a grounded answer draws on (its number), or 0 for "I don't know": P([0]) at the threshold.
    The retrieval's best example ([1]) unless the model is sure of another one (OTHER_EXAMPLE_SHARE of the
    probability it gives the examples). With n-gram retrieval, on ACME, the model's own choice among the three was
    right for 27.5% of reworded questions, the retrieval's first for 30%, this rule at 0.7 for 32.5%; with the
    embedder the first is right far more often (ACME asked in Russian: own choice 60%, first 72%, the rule at 0.7
    68%, at 0.8 76%)."""
    if choice[0] >= no_answer_above or len(choice) < 2:
        return 0
    best = max((d for d in choice if d), key=lambda d: choice[d])
    examples = sum(p for d, p in choice.items() if d)
    if best != 1 and examples > 0 and choice[best] / examples < share:
        return 1
    return best


def read_grounded(raw: str, hits: Sequence[Hit], token_logprobs: Sequence[float] = (),
                  alternatives: Sequence[Sequence[tuple[str, float]]] = (), *,
                  no_answer_above: float | None = None) -> GroundedAnswer:
    """Strip the citation; [0] (or a number with no example) is "I don't know". An answer that is a copy of the
    cited example with a slip (a dropped letter of a code) is the example's answer verbatim: what experts
    approved, never a near-copy.

    With no_answer_above (a calibrated adapter) and the citation's probabilities, the choice is not the
    greedy number but a decision: "I don't know" when P([0]) reaches the threshold, else the likeliest
    example, whose approved answer is the text when the model's own words went elsewhere (it wrote [0], or
    another number)."""
    match = _CITATION.match(raw)
    probability = math.exp(min(token_logprobs[:3])) if len(token_logprobs) >= 3 else None
    choice = citation_choice(alternatives, len(hits)) if no_answer_above is not None and hits else None
    if choice is not None:
        p0 = round(choice[0], 4)
        best = decide_citation(choice, no_answer_above)
        if best == 0:
            return GroundedAnswer(text="", cited=None, abstained=True, choice_probability=p0,
                                  no_answer_probability=p0, choice=choice)
        source = hits[best - 1]
        text = raw[match.end():].strip() if match is not None and int(match.group(1)) == best else source.answer
        if not text or token_f1(text, source.answer) >= SNAP_F1:
            text = source.answer
        return GroundedAnswer(text=text, cited=best - 1, abstained=False, choice_probability=round(choice[best], 4),
                              no_answer_probability=p0, choice=choice)
    if match is None:  # no citation (an older adapter, a closed-book answer): the text as it is
        return GroundedAnswer(text=raw.strip(), cited=None, abstained=False, choice_probability=probability)
    number = int(match.group(1))
    text = raw[match.end():].strip()
    if number == 0 or number > len(hits):
        return GroundedAnswer(text="", cited=None, abstained=True, choice_probability=probability)
    source = hits[number - 1]
    if text and token_f1(text, source.answer) >= SNAP_F1:
        text = source.answer
    return GroundedAnswer(text=text, cited=number - 1, abstained=False, choice_probability=probability)


_PARTIAL = re.compile(r"^\s*(\[\d{0,2}\]?)?\s*$")  # a beginning that may still become a citation


class CitationFilter:
    """Streams a grounded answer without its leading citation: holds the first characters back until the
    marker is complete (or clearly absent); after [0] ("I don't know") it lets nothing through, nor after a
    number that decide(number) rejects (the calibrated choice went to another example, or to "I don't know":
    the caller shows the final text instead)."""

    def __init__(self, decide=None):
        self.decide = decide
        self.raw = ""
        self.start: int | None = None  # where the answer text starts; -1: nothing to show
        self.sent = 0

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.start is None:
            match = _CITATION.match(self.raw)
            if match and match.end() < len(self.raw):
                number = int(match.group(1))
                shown = self.decide(number) if self.decide is not None else number != 0
                self.start = match.end() if shown else -1
            elif match is None and not _PARTIAL.match(self.raw):
                self.start = 0
            else:
                return ""
            self.sent = self.start
        if self.start < 0:
            return ""
        out = self.raw[self.sent:]
        self.sent = len(self.raw)
        return out


@dataclass(frozen=True)
class Grounding:
    """How a trained adapter answers: its recipe, how many examples it was shown, the abstain threshold."""

    recipe: str = "closed"  # "grounded" (trained with retrieved examples) or "closed" (closed book)
    k: int = DEFAULT_K
    threshold: float = DEFAULT_THRESHOLD  # retrieval confidence below which the answer is "I don't know"
    min_choice_probability: float = 0.0  # a grounded answer citing its example with less is "I don't know"
    no_answer_above: float | None = None  # P([0]) from which the answer is "I don't know" (None: older adapter,
    #   the greedy citation and min_choice_probability decide)
    calibrated_on: int = 0  # validation questions the threshold was set on (0: the default)
    similarity_threshold: float | None = None  # the embedding similarity below which a question in another
    #   language than the examples is "I don't know" (None: no embedder, or an older adapter)
    abstain_by: str = "model"  # "retrieval": only the retrieval threshold says "I don't know" (the model's P([0])
    #   is measured and kept, but withheld 45-82% of answerable questions on held-out sets); "model": both

    @property
    def model_no_answer_above(self) -> float | None:
        """The P([0]) threshold answers are read with (NEVER when the retrieval alone decides)."""
        return NEVER if self.abstain_by == "retrieval" and self.no_answer_above is not None else self.no_answer_above

    def no_answer_above_for(self, question: str, hits: Sequence[Hit]) -> float | None:
        """The P([0]) threshold for this question: NEVER for a question in another language than its examples
        (P([0]) was calibrated on questions in the examples' language: Russian questions to the English Harbor
        Line FAQ reached it for 98% of answerable ones; the similarity threshold judges them)."""
        if self.model_no_answer_above is not None and self.similarity_threshold is not None and hits \
                and cross_lingual(question, hits[0]):
            return NEVER
        return self.model_no_answer_above

    def save(self, folder) -> None:
        Path(folder, GROUNDING_FILE).write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, folder) -> "Grounding":
        path = Path(folder, GROUNDING_FILE) if folder else None
        if path is None or not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def answer_mode(adapter_dir) -> str:
    """How a trained folder answers users: grounded when it was trained that way, else closed book (tuned)."""
    return "grounded" if Grounding.load(adapter_dir).recipe == "grounded" else "tuned"


def cross_lingual(question: str, hit: Hit) -> bool:
    """A question in another script than the example it found (Russian asking English examples, or back): the
    n-grams share nothing there, so the embedding's similarity alone says how close they are. The answer tells
    the example's language (a variation's question may be an English one typed with the Russian layout on)."""
    return has_cyrillic(question) != has_cyrillic(hit.answer)


def judged(question: str, hits: Sequence[Hit], threshold: float, similarity_threshold: float | None
           ) -> tuple[float, float]:
    """(confidence, the threshold it is compared with): the hybrid score, or for a question in another language
    than its examples the embedding's similarity against its own threshold."""
    if hits and hits[0].similarity is not None and similarity_threshold is not None \
            and cross_lingual(question, hits[0]):
        return round(float(hits[0].similarity), 4), similarity_threshold
    return confidence(hits), threshold


def confidence(hits: Sequence[Hit]) -> float:
    """0..1: how similar the question is to the best example (the retrieval half of "am I sure")."""
    return round(float(hits[0].score), 4) if hits else 0.0


def retrieval_scores(index: Retriever, items) -> tuple[list[float], list[float]]:
    """The retrieval confidence of validation questions as they are (their fact is in the index: in scope) and
    with their own fact's family left out (as if the FAQ lacked it: out of scope, on the same kind of question)."""
    inside = [confidence(index.search(i.question, 1)) for i in items]
    outside = [confidence(index.search(i.question, 1, exclude=lambda d, g=i.group: d.group == g)) for i in items]
    return inside, outside


def similarity_threshold(index: Retriever, items) -> float | None:
    """The embedding similarity below which a question in another language than the examples is "I don't know":
    left_out_quantile of the validation questions with their fact left out, less CROSS_LINGUAL_OFFSET (a question
    and its example in two languages are less similar than in one); None without an embedder."""
    if index.embedder is None or not items:
        return None
    left_out = sorted(h[0].similarity for i in items
                      if (h := index.search(i.question, 1, exclude=lambda d, g=i.group: d.group == g)))
    if not left_out:
        return None
    at = left_out[min(len(left_out) - 1, max(0, int(math.ceil(LEFT_OUT_QUANTILE * len(left_out))) - 1))]
    return round(at - CROSS_LINGUAL_OFFSET, 4)


def calibrate_threshold(inside: Sequence[float], outside: Sequence[float] = (), *,
                        left_out_quantile: float = LEFT_OUT_QUANTILE) -> float:
    """The retrieval confidence below which the assistant says it does not know: above left_out_quantile of the
    validation questions whose fact was left out of the index (retrieval_scores). Not capped by the in-scope
    ones: those are mutations of trained questions, and a few (a wrong keyboard layout) score like nothing in
    the index; capping by them let 90% of a 20-fact run's out-of-scope questions through. With no left-out
    scores, a margin below every in-scope one."""
    if not inside:
        return DEFAULT_THRESHOLD
    if not outside:
        return round(min(inside) * MARGIN, 4)
    out = sorted(outside)
    return round(out[min(len(out) - 1, max(0, int(math.ceil(left_out_quantile * len(out))) - 1))] + 1e-4, 4)


def abstention(inside: Sequence[float], outside: Sequence[float], answerable: Sequence[float],
               unanswerable: Sequence[float], no_answer_above: float | None) -> tuple[str, float]:
    """(abstain_by, retrieval threshold): whichever evidence separates the run's validation questions better,
    by Youden's J at its threshold: the retrieval (in scope against left out) alone, or the model's P([0])
    (shown its own fact against shown only others) beside it. The model reads what retrieval blurs, such as
    another entity's name in the same question."""
    threshold = calibrate_threshold(inside, outside)
    if no_answer_above is None or not (inside and outside and answerable and unanswerable):
        return "retrieval", threshold
    j_retrieval = sum(s < threshold for s in outside) / len(outside) - sum(s < threshold for s in inside) / len(inside)
    j_model = (sum(p >= no_answer_above for p in unanswerable) / len(unanswerable)
               - sum(p >= no_answer_above for p in answerable) / len(answerable))
    return ("model" if j_model > j_retrieval else "retrieval"), threshold


def default_threshold(retriever: Retriever) -> float:
    """The "I don't know" threshold with nothing calibrated yet. It judges every question by the hybrid score:
    one in another language than the examples scores low there, so it goes to the experts until a trained
    version calibrates the similarity threshold (before that, gibberish scored as high a similarity)."""
    return DEFAULT_HYBRID_THRESHOLD if retriever.embedder is not None else DEFAULT_THRESHOLD


def citation_distributions(model, tokenizer, items, *, system_prompt: str, device,
                           k: int = DEFAULT_K) -> list[tuple[int, dict[int, float]]]:
    """For grounded items (question with its context, answer "[i] …"): (the right number i, {number:
    probability} over [0]..[k]) at the citation, teacher-forced (one forward pass each; no generation)."""
    import torch

    from tuning.data.dataset import encode_item

    digit_ids = {}
    for d in range(k + 1):
        ids = [t for t in tokenizer.encode(f"[{d}]", add_special_tokens=False)
               if tokenizer.decode([t]).strip() == str(d)]
        if ids:
            digit_ids[d] = ids[0]
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for item in items:
            enc = encode_item(tokenizer, item.question, item.answer, system_prompt=system_prompt)
            start = next((n for n, label in enumerate(enc.labels) if label != -100), None)
            digit = next((n for n in range(start or 0, len(enc.input_ids))
                          if tokenizer.decode([enc.input_ids[n]]).strip().isdigit()), None) if start is not None \
                else None
            if digit is None:
                continue
            ids = torch.tensor([enc.input_ids[:digit]], device=device)
            probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
            mass = {d: float(probs[t]) for d, t in digit_ids.items()}
            total = sum(mass.values()) or 1.0
            right = int(tokenizer.decode([enc.input_ids[digit]]).strip())
            out.append((right, {d: p / total for d, p in mass.items()}))
    model.train(was_training)
    return out


def calibrate_no_answer(answerable: Sequence[float], unanswerable: Sequence[float]) -> float:
    """The P([0]) from which a grounded answer is "I don't know": the threshold that best separates validation
    questions shown their own fact (answerable) from the same questions shown only other facts (unanswerable),
    by the share of each it gets right (Youden's J); on a tie the higher one (fewer questions withheld). When no
    threshold separates them significantly (J below the Kolmogorov-Smirnov critical value), the highest one."""
    low, high = NO_ANSWER_RANGE
    if not answerable or not unanswerable:
        return DEFAULT_NO_ANSWER
    candidates = sorted({low, high, *(p for p in [*answerable, *unanswerable] if low <= p <= high)})
    best, best_j = DEFAULT_NO_ANSWER, -2.0
    for t in candidates:
        j = sum(p >= t for p in unanswerable) / len(unanswerable) - sum(p >= t for p in answerable) / len(answerable)
        if j >= best_j:
            best, best_j = t, j
    n, m = len(answerable), len(unanswerable)
    significant = best_j >= max(MIN_SEPARATION, KS_C * math.sqrt((n + m) / (n * m)))
    return round(best if significant else high, 4)
