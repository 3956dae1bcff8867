"""Import reports in the user's language: each skipped line's reason from its code, via the text catalogue."""

from __future__ import annotations

import re

from bot.telegram.texts import catalogue, label, t
from tuning.data.formats import LineError
from tuning.data.importing import ImportReport, line_ranges

CSV_FIELD_LIMIT = re.compile(r"field larger than field limit \((\d+)\)")  # Python's csv.Error for a huge cell


def plural_form(lang: str, n: int) -> str:
    """The form of a noun counted n times: "one", "few" or "many" (1 пример, 2 примера, 5 примеров)."""
    if lang != "ru":
        return "one" if n == 1 else "many"
    if n % 10 == 1 and n % 100 != 11:
        return "one"
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return "few"
    return "many"


def line_reason(error: LineError, lang: str) -> str:
    """Why a line was skipped, in `lang` (the English reason for a code the catalogue does not know)."""
    key = f"line_error_{error.code}"
    if not error.code or key not in catalogue("en"):
        return error.reason
    params = dict(error.params)
    if "kind" in params:  # a JSON type: "array", "null"…
        params["kind"] = label(lang, "json_type", params["kind"])
    if error.code == "invalid_json":
        params["detail"] = json_problem(str(params.get("detail", "")), lang)
    if error.code == "csv_error" and (limit := CSV_FIELD_LIMIT.fullmatch(str(params.get("detail", "")))):
        params["detail"] = t(lang, "csv_problem_field_limit", limit=limit.group(1))
    return t(lang, key, **params)


def json_problem(message: str, lang: str) -> str:
    """Python's json.JSONDecodeError.msg ("Expecting value") said in `lang` (the English catalogue's "json_problem_*"
    are those messages, matched as prefixes); an unknown one as it is."""
    english = catalogue("en")
    key = next((key for key in english if key.startswith("json_problem_") and message.startswith(english[key])), None)
    return t(lang, key) if key else message


def import_summary(report: ImportReport, lang: str, *, max_lines: int = 20) -> str:
    """What an upload added, which lines were already there and which were skipped, and why."""
    out = []
    if report.added:
        state = "approved" if report.approved else "pending"
        out.append(t(lang, f"import_added_{state}_{plural_form(lang, report.added)}", n=report.added))
    else:
        out.append(t(lang, "import_nothing_new" if report.duplicates else "import_nothing_added"))
    if report.duplicates:
        n = len(report.duplicates)
        out.append(t(lang, f"import_duplicates_{plural_form(lang, n)}", n=n,
                     lines=line_ranges([line for line, _ in report.duplicates])))
    if report.errors:
        n = len(report.errors)
        out.append(t(lang, f"import_bad_lines_{plural_form(lang, n)}", n=n))
        out.extend(t(lang, "import_line_error", line=error.line, reason=line_reason(error, lang))
                   for error in report.errors[:max_lines])
        if n > max_lines:
            out.append(t(lang, "import_more", n=n - max_lines))
    return "\n".join(out)
