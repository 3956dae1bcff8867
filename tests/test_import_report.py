"""The bot's import report: skipped lines' reasons in the user's language, from their codes and the catalogue."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bot.telegram.import_report import import_summary, line_reason, plural_form
from bot.telegram.texts import LANGUAGES, catalogue
from tuning.data.formats import MESSAGES, read_examples
from tuning.data.importing import import_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def jsonl(*objs) -> bytes:
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs).encode()


BAD_JSONL = jsonl(
    {"question": "good", "answer": "fine"},                       # 1
    '{"question": "broken", "answer": "x"',                       # 2 invalid_json
    "[1, 2]",                                                     # 3 not_object
    {"question": "only question"},                                # 4 missing
    {"question": "   ", "answer": "x"},                           # 5 empty
    {"question": 42, "answer": "x"},                              # 6 wrong_type
    {"question": "long", "answer": "x" * 101},                    # 7 too_long
    {"foo": "bar"},                                               # 8 unknown_shape
    {"question": "GOOD!", "answer": "again"},                     # 9 duplicate_in_file
    {"question": "s", "answer": "a", "split": "holdout"},         # 10 bad_split
    {"question": "m", "answer": "a", "must_contain": "a"},        # 11 not_string_list
    {"messages": [{"role": "user", "content": "only user"}]},     # 12 bad_messages
    {"messages": "not a list"},                                   # 13 messages_not_list
    {"question": "refused", "answer": "boom"},                    # 14 storage (the trigger below)
) + (b'{"question": "caf\xe9", "answer": "latin-1 byte"}\n'        # 15 encoding
     b'{"question": ' + b"[" * 100_000 + b'\n'                    # 16 too_deep
     b'{"question": "n", "answer": "a", "id": 1' + b"0" * 5000 + b'}\n'  # 17 number_too_long
     b'{"question": "half \\ud83d", "answer": "a"}\n'            # 18 surrogate
     b'{"question": "nul \\u0000", "answer": "a"}\n')            # 19 nul
BAD_CSV = ("question,answer\n"
           "Q1,A1\n"                                              # 2 good
           "Q2,A2,extra\n"                                        # 3 csv_columns
           "Q3,\"" + "x" * 140_000 + "\"\n"                        # 4 csv_error (over the csv field limit)
           "Q5,A\x005\n"                                          # 5 nul
           "\"Q6,A6\nQ7,A7\n").encode()                            # 6 csv_unterminated (to the end of the file)


def refuse_boom(store) -> None:
    store.db.execute("create trigger refuse before insert on examples when new.answer = 'boom' "
                     "begin select raise(abort, 'refused by trigger'); end")


def every_kind_of_bad_line(store, assistant):
    refuse_boom(store)
    jsonl_report = import_file(store, assistant.id, BAD_JSONL, filename="bad.jsonl", max_field_chars=100)
    csv_report = import_file(store, assistant.id, BAD_CSV, filename="bad.csv", max_field_chars=100)
    return jsonl_report, csv_report


def test_the_test_files_cover_every_error_code(store, assistant):
    jsonl_report, csv_report = every_kind_of_bad_line(store, assistant)
    assert [e.line for e in jsonl_report.errors] == list(range(2, 20))
    assert [(e.line, e.code) for e in csv_report.errors] == [
        (3, "csv_columns"), (4, "csv_error"), (5, "nul"), (6, "csv_unterminated")]
    assert {e.code for e in jsonl_report.errors + csv_report.errors} == set(MESSAGES)


def test_a_russian_speaker_gets_every_reason_in_russian(store, assistant, caplog):
    with caplog.at_level("WARNING", logger="tunebot.importing"):
        jsonl_report, csv_report = every_kind_of_bad_line(store, assistant)
    for report in (jsonl_report, csv_report):
        text = import_summary(report, "ru")
        for error in report.errors:
            reason = line_reason(error, "ru")
            assert f"  строка {error.line}: {reason}" in text
            assert reason != error.reason and re.search("[а-я]", reason), (error.code, reason)
            english_words = set(re.findall(r"[a-z]{4,}", error.reason)) - set(re.findall(r"[a-z]{4,}", reason))
            assert english_words, (error.code, reason)  # the English wording is gone, not just prefixed
    text = import_summary(jsonl_report, "ru")
    assert text.splitlines()[:2] == ["Добавлен 1 пример (ждёт проверки).", "Пропущено 18 строк с ошибками:"]
    assert "строка 4: нет поля \"answer\"" in text
    assert "строка 14: не сохранено: база данных отказала (the database refused it (refused by trigger))" in text
    assert "line 14 not saved: the database refused it (refused by trigger)" in caplog.text  # the detail, for admins
    assert "строка 9: тот же вопрос, что в строке 1" in text


def test_english_rendering_matches_the_cli_summary(store, assistant):
    jsonl_report, csv_report = every_kind_of_bad_line(store, assistant)
    again = import_file(store, assistant.id, BAD_JSONL, filename="bad.jsonl", max_field_chars=100)
    for report in (jsonl_report, csv_report, again):
        assert import_summary(report, "en") == report.summary()
        for error in report.errors:
            assert line_reason(error, "en") == error.reason
    many = import_file(store, assistant.id, b"".join(b"not json %d\n" % i for i in range(30)), filename="x.jsonl")
    assert import_summary(many, "en", max_lines=20) == many.summary(max_lines=20)
    assert import_summary(many, "ru", max_lines=20).endswith("  … и ещё 10")


def test_russian_counts_take_the_right_form(store, assistant):
    report = import_file(store, assistant.id, EXAMPLES / "bad_lines.jsonl")
    assert import_summary(report, "ru").splitlines()[:2] == ["Добавлено 17 примеров (ждут проверки).",
                                                            "Пропущено 3 строки с ошибками:"]
    again = import_file(store, assistant.id, EXAMPLES / "bad_lines.jsonl")
    assert import_summary(again, "ru").splitlines()[:2] == [
        "Ничего нового: все подходящие строки уже есть.",
        "Уже есть, пропущено 17 вопросов (строки 1-3, 5-10, 12-16, 18-20)."]
    one = import_file(store, assistant.id, jsonl({"question": "Один?", "answer": "Да."}), approve=True)
    assert import_summary(one, "ru") == "Добавлен 1 пример (одобрен)."
    assert [plural_form("ru", n) for n in (1, 2, 5, 11, 12, 21, 22, 25, 112)] == [
        "one", "few", "many", "many", "many", "one", "few", "many", "many"]
    assert [plural_form("en", n) for n in (0, 1, 2, 21)] == ["many", "one", "many", "many"]


def test_catalogue_has_every_code_and_plural_form():
    for lang in LANGUAGES:
        texts = catalogue(lang)
        assert {f"line_error_{code}" for code in MESSAGES} <= set(texts), lang
        for stem in ("import_added_pending", "import_added_approved", "import_duplicates", "import_bad_lines"):
            assert all(f"{stem}_{form}" in texts for form in ("one", "few", "many")), (lang, stem)


def test_an_unknown_code_falls_back_to_the_english_reason():
    [error] = read_examples(b'{"question": "q"}\n').errors
    assert line_reason(error, "ru") == 'нет поля "answer"'
    unknown = type(error)(3, "some new reason", "brand_new_code", ())
    assert line_reason(unknown, "ru") == "some new reason"


def test_json_syntax_errors_and_types_are_described_in_russian_with_their_position():
    broken = ['{"question": "q", "answer": }', "{'question': 'q'}", '{"question" "q"}', '{"question": "q" "a": 1}',
              '{"question": "q", "answer": "a"} extra', '{"question": "q', '{"question": "a\tb", "answer": "a"}',
              '{"question": "\\q", "answer": "a"}', '{"question": "\\u12", "answer": "a"}']
    typed = ["[1, 2]", "null", '{"question": true, "answer": "a"}', '{"question": "q", "answer": {"a": 1}}',
             '{"question": "q", "answer": "a", "must_contain": "a"}']
    report = read_examples(jsonl(*broken, *typed))
    assert [e.code for e in report.errors] == ["invalid_json"] * len(broken) + [
        "not_object", "not_object", "wrong_type", "wrong_type", "not_string_list"]
    for error in report.errors:
        reason = line_reason(error, "ru")
        assert set(re.findall(r"[A-Za-z_]+", reason)) <= {"JSON", "question", "answer", "must_contain"}, reason
        assert line_reason(error, "en") == error.reason
    reasons = [line_reason(e, "ru") for e in report.errors]
    assert reasons[0] == "некорректный JSON: здесь ожидалось значение (текст пишется в двойных кавычках), позиция 29"
    assert reasons[5] == "некорректный JSON: строка не закрыта двойной кавычкой, позиция 14"
    assert len(set(reasons[:len(broken)])) == len(broken)  # each syntax problem has its own description
    assert reasons[len(broken):] == [
        'ожидался JSON-объект вида {"question": …, "answer": …}, а не массив',
        'ожидался JSON-объект вида {"question": …, "answer": …}, а не пустое значение',
        'поле "question" должно быть строкой, а не логическое значение',
        'поле "answer" должно быть строкой, а не объект',
        'поле "must_contain" должно быть списком строк, а не строка']


def test_an_unknown_json_message_is_shown_as_it_is():
    [error] = read_examples(b'{"question": }\n').errors
    odd = type(error)(1, "invalid JSON: Something new at column 3", "invalid_json",
                      (("detail", "Something new"), ("column", 3)))
    assert line_reason(odd, "ru") == "некорректный JSON: Something new, позиция 3"


def test_a_csv_cell_over_the_reader_limit_is_described_in_russian(store, assistant):
    _, csv_report = every_kind_of_bad_line(store, assistant)
    [error] = [e for e in csv_report.errors if e.code == "csv_error"]
    assert line_reason(error, "ru") == ("не удалось разобрать CSV: поле длиннее 131072 символов (предел чтения CSV); "
                                        "сократите его или разбейте на несколько")
    assert line_reason(error, "en") == error.reason == "cannot parse CSV: field larger than field limit (131072)"
