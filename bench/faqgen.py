"""Procedural FAQ of invented facts, so that benchmarks measure learning, not prior knowledge.

Every fact pairs an invented entity (a random-syllable product, branch, route, person...) with an
invented value (a price, a time, a code like "KX-4471", a phone number...). The train set has one
canonical question per fact; the test set has 2 customer-style rewordings per fact (other templates,
word order, synonyms, lowercase, abbreviations, deterministic typos) with "must_contain" = the
invented value(s) and "split": "test". English ("en") and Russian ("ru"). Deterministic per seed;
entity names are unique across the whole FAQ and no fact's must_contain tokens all occur in another
fact's answer. Standard library only.

    python bench/faqgen.py --facts 200 --language ru --seed 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LANGUAGES = ("en", "ru")

# ---------------------------------------------------------------- invented names

_EN_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
              "st", "t", "tr", "v", "z", "th", "sh", "h", "j", "q"]
_EN_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "y"]
_EN_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "x", "th", "nd", "rk"]
_EN_SURNAME_ENDS = ["son", "sik", "ell", "ard", "ov", "berg", "wick", "ley", "mont", "ani"]

_RU_ONSETS = ["б", "в", "г", "д", "ж", "з", "к", "л", "м", "н", "п", "р", "с", "т", "ф", "х", "ч",
              "ш", "бр", "др", "кр", "пр", "ст", "тр", "гл", "зв"]
_RU_VOWELS = ["а", "е", "и", "о", "у", "я", "ы", "ё"]
_RU_CODAS = ["", "", "", "н", "р", "л", "с", "к", "м", "в", "т"]
_RU_MALE_ENDS = ["ов", "ин", "ев", "ский", "ман", "ец"]
_RU_FEMALE_ENDS = {"ов": "ова", "ин": "ина", "ев": "ева", "ский": "ская", "ман": "ман", "ец": "ец"}


def _word(rng: random.Random, language: str, syllables: int) -> str:
    onsets, vowels, codas = ((_EN_ONSETS, _EN_VOWELS, _EN_CODAS) if language == "en"
                             else (_RU_ONSETS, _RU_VOWELS, _RU_CODAS))
    parts = [rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(codas)).capitalize()


class _Names:
    """Invented names, unique (case-insensitive) across the whole FAQ."""

    def __init__(self, rng: random.Random, language: str):
        self.rng, self.language, self.used = rng, language, set()

    def _fresh(self, make: Callable[[], str]) -> str:
        for attempt in range(10_000):
            name = make()
            key = name.lower()
            if key not in self.used and len(key) >= 4:
                self.used.add(key)
                return name
        raise RuntimeError("ran out of invented names")

    def entity(self) -> str:
        return self._fresh(lambda: _word(self.rng, self.language, self.rng.choice((2, 2, 3))))

    def person(self) -> str:
        rng = self.rng
        if self.language == "en":
            return self._fresh(lambda: f"{_word(rng, 'en', 2)} {_word(rng, 'en', 1)}{rng.choice(_EN_SURNAME_ENDS)}")

        def make() -> str:
            first = _word(rng, "ru", 2)
            end = rng.choice(_RU_MALE_ENDS)
            if rng.random() < 0.5:
                first = (first[:-1] if first[-1] in "аеиоуяыё" else first) + "а"
                return f"{first} {_word(rng, 'ru', 1)}{_RU_FEMALE_ENDS[end]}"
            return f"{first} {_word(rng, 'ru', 1)}{end}"
        return self._fresh(make)


# ---------------------------------------------------------------- invented values


def _ru_plural(n: int, one: str, few: str, many: str) -> str:
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


def _group(n: int) -> str:
    """12345 -> '12 345' (Russian thousands separator, a plain space)."""
    return f"{n:,}".replace(",", " ")


def _price(rng: random.Random, language: str, lo: int = 5, hi: int = 900) -> tuple[str, list[str]]:
    if language == "en":
        text = f"€{rng.randint(lo, hi)}.{rng.randint(0, 99):02d}"
    else:
        text = f"{_group(rng.randint(lo * 10, hi * 100) // 10 * 10)} ₽"
    return text, [text]


def _time(rng: random.Random, lo_h: int, hi_h: int) -> str:
    return f"{rng.randint(lo_h, hi_h):02d}:{rng.randint(0, 59):02d}"


def _code(rng: random.Random, language: str) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}"


def _phone(rng: random.Random, language: str) -> str:
    if language == "en":
        return f"+31 {rng.choice(['10', '20', '30', '40', '70'])} {rng.randint(200, 899)} {rng.randint(1000, 9999)}"
    return (f"+7 {rng.choice(['495', '499', '812', '343', '383'])} {rng.randint(200, 899)}-"
            f"{rng.randint(10, 99)}-{rng.randint(10, 99)}")


_EN_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
_RU_MONTHS = ["января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа", "сентября",
              "октября", "ноября", "декабря"]


# ---------------------------------------------------------------- fact kinds


@dataclass(frozen=True)
class Kind:
    name: str
    entity: str   # "entity": an invented name; "person": an invented person; "person_value": entity + person as value
    value: Callable[[random.Random, str], tuple[dict, list[str]]]   # (format fields, must_contain)
    canonical: dict[str, list[str]]   # language -> canonical question templates ({e} = entity)
    reworded: dict[str, list[str]]    # language -> customer-style templates
    answer: dict[str, str]            # language -> answer template ({e} and value fields)


def _v_price(rng, lang):
    text, mc = _price(rng, lang)
    return {"v": text}, mc


def _v_hours(rng, lang):
    a, b = _time(rng, 6, 11), _time(rng, 16, 23)
    return {"a": a, "b": b}, [a, b]


def _v_code(rng, lang):
    c = _code(rng, lang)
    return {"v": c}, [c]


def _v_person(rng, lang):  # the generator fills this in from its name pool (kind.entity == "person_value")
    raise NotImplementedError


def _v_weight(rng, lang):
    n, d = rng.randint(1, 80), rng.randint(1, 9)
    text = f"{n}.{d} kg" if lang == "en" else f"{n},{d} кг"
    return {"v": text}, [text]


def _v_phone(rng, lang):
    p = _phone(rng, lang)
    return {"v": p}, [p]


def _v_hours_count(rng, lang):
    n = rng.randint(6, 480)
    text = f"{n} hours" if lang == "en" else f"{n} {_ru_plural(n, 'час', 'часа', 'часов')}"
    return {"v": text}, [text]


def _v_people(rng, lang):
    n = rng.randint(15, 2500)
    text = f"{n} people" if lang == "en" else f"{n} {_ru_plural(n, 'человек', 'человека', 'человек')}"
    return {"v": text}, [text]


def _v_promo(rng, lang):
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    c = "".join(rng.choice(letters) for _ in range(rng.randint(4, 6))) + str(rng.randint(10, 99))
    return {"v": c}, [c]


def _v_months(rng, lang):
    n = rng.randint(7, 240)
    text = f"{n} months" if lang == "en" else f"{n} {_ru_plural(n, 'месяц', 'месяца', 'месяцев')}"
    return {"v": text}, [text]


def _v_gate(rng, lang):
    g = f"{rng.randint(1, 60)}{rng.choice('ABCDEFGH')}"
    text = f"Gate {g}" if lang == "en" else f"выход {g}"
    return {"v": text, "g": g}, [g]


def _v_time(rng, lang):
    t = _time(rng, 5, 23)
    return {"v": t}, [t]


def _v_password(rng, lang):
    word = _word(rng, "en", 2).upper()
    p = f"{word}{rng.randint(10, 999)}"
    return {"v": p}, [p]


def _v_room(rng, lang):
    r = f"{rng.choice('ABCDEFKMN')}-{rng.randint(1, 9)}{rng.randint(0, 4)}{rng.randint(0, 9)}"
    return {"v": r}, [r]


def _v_gb(rng, lang):
    n = rng.randint(5, 9000)
    text = f"{n} GB" if lang == "en" else f"{n} ГБ"
    return {"v": text}, [text]


def _v_speed(rng, lang):
    n = rng.randint(2, 400) * 5
    text = f"{n} Mbit/s" if lang == "en" else f"{n} Мбит/с"
    return {"v": text}, [text]


def _v_email(rng, lang):
    user = _word(rng, "en", 2).lower() + str(rng.randint(1, 99))
    domain = _word(rng, "en", 2).lower()
    e = f"{user}@{domain}.example"
    return {"v": e}, [e]


def _v_date(rng, lang):
    m, d = rng.randrange(12), rng.randint(1, 28)
    text = f"{d} {_EN_MONTHS[m]}" if lang == "en" else f"{d} {_RU_MONTHS[m]}"
    return {"v": text}, [text]


def _v_km(rng, lang):
    n, d = rng.randint(1, 150), rng.randint(1, 9)
    text = f"{n}.{d} km" if lang == "en" else f"{n},{d} км"
    return {"v": text}, [text]


def _v_deposit(rng, lang):
    text, mc = _price(rng, lang, 20, 600)
    return {"v": text}, mc


KINDS: list[Kind] = [
    Kind("price", "entity", _v_price,
         {"en": ["How much does the {e} kettle cost?", "What is the price of the {e} kettle?",
                 "What does the {e} kettle cost?"],
          "ru": ["Сколько стоит чайник «{e}»?", "Какая цена у чайника «{e}»?"]},
         {"en": ["how much is the {e} kettle", "{e} kettle price?", "what do you charge for a {e} kettle",
                 "price of {e} kettle pls", "hey, what would the {e} kettle set me back?"],
          "ru": ["скок стоит чайник {e}", "чайник «{e}» почём?", "цена чайника {e} какая",
                 "сколько за чайник «{e}» надо отдать", "чё по цене чайник {e}?"]},
         {"en": "The {e} kettle costs {v}.", "ru": "Чайник «{e}» стоит {v}."}),
    Kind("hours", "entity", _v_hours,
         {"en": ["What are the opening hours of the {e} branch?", "When is the {e} branch open?"],
          "ru": ["Какие часы работы у филиала «{e}»?", "Когда открыт филиал «{e}»?"]},
         {"en": ["{e} branch open when?", "what time does the {e} branch open and close",
                 "opening hrs {e} branch", "till when is ur {e} branch open?"],
          "ru": ["во скок открывается филиал {e} и до скольки работает", "филиал «{e}» режим работы?",
                 "часы работы {e} филиал", "когда работает филиал «{e}»"]},
         {"en": "The {e} branch is open daily from {a} to {b}.",
          "ru": "Филиал «{e}» работает ежедневно с {a} до {b}."}),
    Kind("service_code", "entity", _v_code,
         {"en": ["What is the service code for {e} cleaning?", "Which code do I use to order {e} cleaning?"],
          "ru": ["Какой код у услуги «{e}»?", "Какой код нужен, чтобы заказать услугу «{e}»?"]},
         {"en": ["code for {e} cleaning?", "{e} cleaning - what code do i enter", "service code of {e} cleaning pls",
                 "i want {e} cleaning, which code"],
          "ru": ["код услуги {e} какой", "услуга «{e}» код?", "чтобы заказать {e} какой код вводить",
                 "подскажите код услуги «{e}» пжл"]},
         {"en": "The service code for {e} cleaning is {v}.", "ru": "Код услуги «{e}» — {v}."}),
    Kind("manager", "person_value", _v_person,
         {"en": ["Who manages the {e} department?", "Who is the head of the {e} department?"],
          "ru": ["Кто руководит отделом «{e}»?", "Кто начальник отдела «{e}»?"]},
         {"en": ["who runs the {e} dept?", "{e} department manager name?", "who is in charge of {e} department",
                 "name of the boss of {e} dept pls"],
          "ru": ["кто главный в отделе {e}", "отдел «{e}» кто начальник?", "руководитель отдела {e} кто",
                 "как зовут начальника отдела «{e}»"]},
         {"en": "The {e} department is managed by {v}.", "ru": "Отделом «{e}» руководит {v}."}),
    Kind("max_weight", "entity", _v_weight,
         {"en": ["What is the maximum weight for the {e} plan?", "How heavy can a shipment be on the {e} plan?"],
          "ru": ["Какой максимальный вес на тарифе «{e}»?", "Сколько можно отправить по весу на тарифе «{e}»?"]},
         {"en": ["max weight {e} plan?", "how many kg can i send with the {e} plan", "weight limit on {e} plan",
                 "{e} plan, whats the heaviest allowed"],
          "ru": ["макс вес на тарифе {e}", "тариф «{e}» скок кг можно?", "ограничение по весу тариф {e}",
                 "какой вес максимум по тарифу «{e}»"]},
         {"en": "The maximum weight on the {e} plan is {v}.", "ru": "Максимальный вес на тарифе «{e}» — {v}."}),
    Kind("phone", "entity", _v_phone,
         {"en": ["What is the phone number of the {e} office?", "How can I call the {e} office?"],
          "ru": ["Какой телефон у офиса «{e}»?", "По какому номеру звонить в офис «{e}»?"]},
         {"en": ["phone nr of {e} office?", "{e} office number pls", "how do i ring the {e} office",
                 "need to call {e} office, number?"],
          "ru": ["тел офиса {e}", "номер офиса «{e}» дайте", "куда звонить в офис {e}",
                 "телефон офис «{e}» какой"]},
         {"en": "You can call the {e} office on {v}.", "ru": "Телефон офиса «{e}»: {v}."}),
    Kind("delivery", "entity", _v_hours_count,
         {"en": ["How long does delivery to {e} take?", "How fast do you deliver to {e}?"],
          "ru": ["Сколько идёт доставка в город «{e}»?", "Как долго доставка до города «{e}»?"]},
         {"en": ["delivery time to {e}?", "how long till my order gets to {e}", "shipping to {e} takes how long",
                 "{e} delivery, how many hrs"],
          "ru": ["скок ехать доставке в {e}", "доставка до {e} сколько по времени?", "как быстро привезете в {e}",
                 "в {e} за сколько доставите"]},
         {"en": "Delivery to {e} takes {v}.", "ru": "Доставка в город «{e}» занимает {v}."}),
    Kind("capacity", "entity", _v_people,
         {"en": ["How many people fit in the {e} hall?", "What is the capacity of the {e} hall?"],
          "ru": ["Сколько человек вмещает зал «{e}»?", "Какая вместимость у зала «{e}»?"]},
         {"en": ["how many ppl can the {e} hall hold", "{e} hall capacity?", "max guests in {e} hall",
                 "would a big group fit in the {e} hall, how many"],
          "ru": ["скок людей влезет в зал {e}", "зал «{e}» на сколько человек?", "вместимость зал {e}",
                 "сколько гостей помещается в зале «{e}»"]},
         {"en": "The {e} hall holds up to {v}.", "ru": "Зал «{e}» вмещает {v}."}),
    Kind("promo", "entity", _v_promo,
         {"en": ["What is the discount code for the {e} promotion?", "Which promo code gives the {e} discount?"],
          "ru": ["Какой промокод у акции «{e}»?", "Какой код скидки по акции «{e}»?"]},
         {"en": ["promo code {e}?", "code for the {e} deal pls", "whats the {e} discount code",
                 "i saw the {e} promotion, what code do i type"],
          "ru": ["промик на акцию {e}", "акция «{e}» какой промокод?", "код скидки {e} подскажите",
                 "чё за промокод у акции «{e}»"]},
         {"en": "The discount code for the {e} promotion is {v}.", "ru": "Промокод акции «{e}» — {v}."}),
    Kind("warranty", "entity", _v_months,
         {"en": ["How long is the warranty on the {e} model?", "What warranty does the {e} model have?"],
          "ru": ["Какая гарантия на модель «{e}»?", "Сколько длится гарантия на модель «{e}»?"]},
         {"en": ["warranty {e} model?", "how long is {e} covered by warranty", "{e} model guarantee period",
                 "if my {e} breaks, how long is the warranty"],
          "ru": ["гарантия на {e} скок", "модель «{e}» гарантия сколько?", "сколько месяцев гарантии у {e}",
                 "какой срок гарантии на модель {e}"]},
         {"en": "The {e} model has a warranty of {v}.", "ru": "Гарантия на модель «{e}» — {v}."}),
    Kind("gate", "entity", _v_gate,
         {"en": ["Which gate does the {e} line leave from?", "From which gate does the {e} line depart?"],
          "ru": ["С какого выхода отправляется линия «{e}»?", "Какой выход у линии «{e}»?"]},
         {"en": ["{e} line gate?", "where do i board the {e} line", "gate nr for {e} line",
                 "which gate 4 the {e} line pls"],
          "ru": ["линия {e} с какого выхода", "выход на линию «{e}» какой?", "где садиться на линию {e}",
                 "номер выхода линия «{e}»"]},
         {"en": "The {e} line leaves from {v}.", "ru": "Линия «{e}» отправляется с выхода {g}."}),
    Kind("first_departure", "entity", _v_time,
         {"en": ["When does the first {e} shuttle leave?", "What time is the first {e} shuttle?"],
          "ru": ["Во сколько отправляется первый шаттл «{e}»?", "Когда уходит первый шаттл «{e}»?"]},
         {"en": ["first {e} shuttle time?", "earliest {e} shuttle in the morning", "when is the 1st {e} shuttle",
                 "what time does the {e} shuttle start running"],
          "ru": ["первый шаттл {e} во скок", "шаттл «{e}» первый рейс когда?", "самый ранний шаттл {e}",
                 "со скольки ходит шаттл «{e}»"]},
         {"en": "The first {e} shuttle leaves at {v}.", "ru": "Первый шаттл «{e}» отправляется в {v}."}),
    Kind("wifi", "entity", _v_password,
         {"en": ["What is the Wi-Fi password in the {e} lounge?", "How do I get on the Wi-Fi in the {e} lounge?"],
          "ru": ["Какой пароль от Wi-Fi в лаунже «{e}»?", "Как подключиться к Wi-Fi в лаунже «{e}»?"]},
         {"en": ["wifi pw {e} lounge?", "{e} lounge wi fi password pls", "whats the internet code in the {e} lounge",
                 "cant get online in {e} lounge, password?"],
          "ru": ["пароль от вайфая в лаунже {e}", "лаунж «{e}» wifi пароль?", "какой пасс от wi-fi в {e}",
                 "не могу подключиться к интернету в лаунже «{e}», пароль какой"]},
         {"en": "The Wi-Fi password in the {e} lounge is {v}.", "ru": "Пароль Wi-Fi в лаунже «{e}» — {v}."}),
    Kind("room", "person", _v_room,
         {"en": ["Which room is {e} in?", "Where can I find {e}'s office?"],
          "ru": ["В каком кабинете принимает {e}?", "Где кабинет, в котором принимает {e}?"]},
         {"en": ["room of {e}?", "where does {e} sit", "{e} office room nr",
                 "looking for {e}, which room"],
          "ru": ["{e} в каком каб", "кабинет где принимает {e}?", "куда идти к {e}, номер кабинета",
                 "номер каб {e}"]},
         {"en": "{e} works in room {v}.", "ru": "{e} принимает в кабинете {v}."}),
    Kind("storage", "entity", _v_gb,
         {"en": ["How much storage does the {e} plan include?", "What is the storage limit of the {e} plan?"],
          "ru": ["Сколько места даёт тариф «{e}»?", "Какой объём хранилища на тарифе «{e}»?"]},
         {"en": ["{e} plan storage?", "how many gb do i get with {e}", "storage limit on the {e} plan",
                 "is {e} plan big enough, how much space"],
          "ru": ["скок гигов на тарифе {e}", "тариф «{e}» сколько места?", "объем хранилища {e}",
                 "сколько гб дают по тарифу «{e}»"]},
         {"en": "The {e} plan includes {v} of storage.", "ru": "Тариф «{e}» включает {v} хранилища."}),
    Kind("speed", "entity", _v_speed,
         {"en": ["What download speed does the {e} tariff give?", "How fast is the {e} tariff?"],
          "ru": ["Какая скорость у тарифа «{e}»?", "Какую скорость загрузки даёт тариф «{e}»?"]},
         {"en": ["{e} tariff speed?", "how fast is internet on {e}", "download speed {e} tariff pls",
                 "wat speed do i get with the {e} tariff"],
          "ru": ["скорость тариф {e}", "тариф «{e}» какая скорость?", "скок мегабит на тарифе {e}",
                 "насколько быстрый интернет на тарифе «{e}»"]},
         {"en": "The {e} tariff gives download speeds of up to {v}.",
          "ru": "Тариф «{e}» даёт скорость загрузки до {v}."}),
    Kind("cancel_fee", "entity", _v_price,
         {"en": ["What is the late cancellation fee for the {e} course?",
                 "How much do I pay if I cancel the {e} course late?"],
          "ru": ["Какой штраф за позднюю отмену курса «{e}»?", "Сколько платить, если поздно отменить курс «{e}»?"]},
         {"en": ["cancel {e} course last minute, fee?", "{e} course cancellation charge", "how much if i drop out of {e} course late",
                 "late cancel fee {e} course pls"],
          "ru": ["штраф за отмену курса {e} скок", "курс «{e}» отменить поздно сколько стоит?",
                 "если откажусь от курса {e} в последний момент что заплачу", "сколько за позднюю отмену «{e}»"]},
         {"en": "Cancelling the {e} course late costs {v}.", "ru": "Поздняя отмена курса «{e}» стоит {v}."}),
    Kind("email", "entity", _v_email,
         {"en": ["What is the email address of the {e} team?", "How can I email the {e} team?"],
          "ru": ["Какой адрес почты у команды «{e}»?", "Как написать команде «{e}» на почту?"]},
         {"en": ["email of {e} team?", "{e} team mail address pls", "how do i write to the {e} team",
                 "whats the e-mail for {e} team"],
          "ru": ["почта команды {e}", "команда «{e}» емейл какой?", "куда писать команде {e} на мыло",
                 "адрес email у «{e}»"]},
         {"en": "You can email the {e} team at {v}.", "ru": "Почта команды «{e}»: {v}."}),
    Kind("festival", "entity", _v_date,
         {"en": ["When does the {e} festival take place?", "On what date is the {e} festival?"],
          "ru": ["Когда проходит фестиваль «{e}»?", "Какого числа будет фестиваль «{e}»?"]},
         {"en": ["{e} festival date?", "when is {e} fest", "what day is the {e} festival this year",
                 "{e} festival - when??"],
          "ru": ["фестиваль {e} когда", "фест «{e}» какого числа?", "дата фестиваля {e}",
                 "когда будет фест {e}"]},
         {"en": "The {e} festival takes place on {v}.", "ru": "Фестиваль «{e}» проходит {v}."}),
    Kind("distance", "entity", _v_km,
         {"en": ["How far is the {e} campsite from the station?", "What is the distance from the station to the {e} campsite?"],
          "ru": ["Как далеко кемпинг «{e}» от вокзала?", "Какое расстояние от вокзала до кемпинга «{e}»?"]},
         {"en": ["{e} campsite distance from station?", "how many km from the station to {e} campsite",
                 "is {e} campsite far from the train station", "station to {e} camp how far"],
          "ru": ["скок км от вокзала до кемпинга {e}", "кемпинг «{e}» далеко от вокзала?",
                 "расстояние вокзал кемпинг {e}", "от вокзала до «{e}» далеко идти?"]},
         {"en": "The {e} campsite is {v} from the station.", "ru": "Кемпинг «{e}» находится в {v} от вокзала."}),
    Kind("deposit", "entity", _v_deposit,
         {"en": ["How big is the deposit for renting a {e} bike?", "What deposit do I pay to rent a {e} bike?"],
          "ru": ["Какой залог за прокат велосипеда «{e}»?", "Сколько нужно оставить залога за велосипед «{e}»?"]},
         {"en": ["deposit for {e} bike rental?", "how much deposit on a {e} bike", "renting a {e} bike, deposit amount",
                 "{e} bike rent - deposit pls"],
          "ru": ["залог за велик {e} скок", "велосипед «{e}» какой залог?", "сколько залога за прокат {e}",
                 "чё по залогу за велосипед {e}"]},
         {"en": "Renting a {e} bike requires a deposit of {v}.", "ru": "Залог за прокат велосипеда «{e}» — {v}."}),
]
KINDS_BY_NAME = {k.name: k for k in KINDS}


# ---------------------------------------------------------------- customer-style noise

_EN_SUBS = [(r"\byou\b", "u"), (r"\byour\b", "ur"), (r"\bplease\b", "pls"), (r"\bwhat is\b", "whats"),
            (r"\bhours\b", "hrs"), (r"\bnumber\b", "nr"), (r"\bare\b", "r"), (r"\bfor\b", "4"),
            (r"\bdepartment\b", "dept")]
_RU_SUBS = [(r"\bсколько\b", "скока"), (r"\bчто\b", "чё"), (r"\bпожалуйста\b", "пжл"), (r"\bтелефон\b", "тел"),
            (r"\bподскажите\b", "подскажи"), (r"\bкабинет\b", "каб"), (r"\bсейчас\b", "щас")]
_EN_OPENERS = ["hi, ", "hey ", "hello, ", "quick q: ", ""]
_EN_CLOSERS = [" thx", " thanks", "??", " pls", ""]
_RU_OPENERS = ["здрасьте, ", "добрый день ", "подскажите ", "а ", ""]
_RU_CLOSERS = [" спс", " заранее спасибо", "??", " пжл", ""]
_RU_TO_EN_LAYOUT = dict(zip("йцукенгшщзхъфывапролджэячсмитьбюё",
                            "qwertyuiop[]asdfghjkl;'zxcvbnm,.`"))


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(3)
    if op == 0:                                   # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:                                   # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]         # double a letter


def _noisy(template: str, entity: str, language: str, rng: random.Random, level: int) -> str:
    """Apply customer-style noise to the template text (never inside the entity) and fill it in."""
    pieces = template.split("{e}")
    out = []
    typo_p = 0.4 if level == 1 else 0.7
    layout_p = 0.15
    subs = _EN_SUBS if language == "en" else _RU_SUBS
    for piece in pieces:
        if level >= 1:
            for pattern, repl in subs:
                if rng.random() < 0.6:
                    piece = re.sub(pattern, repl, piece, flags=re.IGNORECASE)
        words = piece.split(" ")
        candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if candidates and level >= 1 and rng.random() < typo_p:
            j = rng.choice(candidates)
            words[j] = _typo(words[j], rng)
            typo_p /= 3                           # rarely more than one typo per question
        if language == "ru" and level >= 2 and layout_p and rng.random() < layout_p:
            candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
            if candidates:                        # one word typed with the keyboard still on Latin
                j = rng.choice(candidates)
                words[j] = "".join(_RU_TO_EN_LAYOUT.get(ch, ch) for ch in words[j].lower())
                layout_p = 0.0
        out.append(" ".join(words))
    text = entity.join(out)
    if rng.random() < 0.7:
        text = text.lower()
    if level >= 1 and rng.random() < 0.5:
        text = text.rstrip("?.! ")
    openers, closers = (_EN_OPENERS, _EN_CLOSERS) if language == "en" else (_RU_OPENERS, _RU_CLOSERS)
    if level >= 2:
        closer = rng.choice(closers)
        opener = rng.choice(openers)
        if opener.strip(" ,") and text.lower().startswith(opener.strip(" ,").lower()):
            opener = ""
        text = opener + text + ("" if closer.strip() and closer.strip() in text else closer)
    return " ".join(text.split())


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w@.+:-]+", " ", text.lower()).split())


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class Fact:
    kind: str                 # a Kind.name
    entity: str               # the invented name the question is about (unique across the FAQ)
    question: str             # canonical question (the train pair)
    answer: str
    must_contain: list[str]   # the invented value(s), each a substring of answer
    rewordings: list[str]     # 2 customer-style test questions


def generate_facts(n_facts: int, *, language: str = "en", seed: int = 0) -> list[Fact]:
    """n_facts invented facts, kinds in shuffled rounds over KINDS; deterministic per (language, seed)."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    if n_facts < 0:
        raise ValueError("n_facts must be >= 0")
    rng = random.Random(f"faqgen:{language}:{seed}")
    names = _Names(rng, language)
    facts: list[Fact] = []
    answers_lower: list[str] = []
    token_sets: list[list[str]] = []
    first_tokens: list[str] = []
    blob = ""                                     # all earlier answers, for a fast pre-check
    order: list[Kind] = []
    for i in range(n_facts):
        if i % len(KINDS) == 0:
            order = KINDS[:]
            rng.shuffle(order)
        kind = order[i % len(KINDS)]
        entity = names.person() if kind.entity == "person" else names.entity()
        for _ in range(200):
            if kind.entity == "person_value":
                person = names.person()
                fields, must = {"v": person}, [person]
            else:
                fields, must = kind.value(rng, language)
            answer = kind.answer[language].format(e=entity, **fields)
            low = answer.lower()
            mc = [t.lower() for t in must]
            # this fact's tokens must not all appear in an earlier answer, nor an earlier fact's in this one
            clash = (all(t in blob for t in mc)
                     and any(all(t in other for t in mc) for other in answers_lower)) or any(
                all(t in low for t in token_sets[j]) for j in [j for j, t in enumerate(first_tokens) if t in low])
            if not clash:
                break
        else:
            raise RuntimeError(f"could not find a distinct value for fact {i} ({kind.name})")
        answers_lower.append(low)
        blob += low + "\n"
        token_sets.append(mc)
        first_tokens.append(mc[0])

        canon_t = rng.choice(kind.canonical[language])
        question = canon_t.format(e=entity)
        templates = kind.reworded[language][:]
        rng.shuffle(templates)
        pool = templates + [t for t in kind.canonical[language] if t != canon_t]
        seen = {_norm(question)}
        rewordings: list[str] = []
        for level, template in zip([1, 2] * len(pool), pool * 2):
            if len(rewordings) == 2:
                break
            q = _noisy(template, entity, language, rng, level)
            if _norm(q) not in seen:
                seen.add(_norm(q))
                rewordings.append(q)
        if len(rewordings) < 2:
            raise RuntimeError(f"could not reword fact {i} ({kind.name})")
        facts.append(Fact(kind.name, entity, question, answer, list(must), rewordings))
    return facts


def generate_faq(n_facts: int, *, language: str = "en", seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Return (train_pairs, test_items) for n_facts invented facts.

    train_pairs: [{"question", "answer"}], one canonical question per fact.
    test_items: [{"question", "answer", "must_contain", "split": "test"}], 2 reworded questions per fact
    (in fact order), must_contain = the fact's invented value(s), each a substring of its answer.
    """
    facts = generate_facts(n_facts, language=language, seed=seed)
    train = [{"question": f.question, "answer": f.answer} for f in facts]
    test = [{"question": q, "answer": f.answer, "must_contain": list(f.must_contain), "split": "test"}
            for f in facts for q in f.rewordings]
    return train, test


def write_faq(n: int, language: str = "en", seed: int = 0, out_dir: str | Path = ".") -> tuple[Path, Path]:
    """Write <out_dir>/faqgen_<language>_<n>_seed<seed>_{train,test}.jsonl and return both paths."""
    train, test = generate_faq(n, language=language, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"faqgen_{language}_{n}_seed{seed}"
    paths = out / f"{stem}_train.jsonl", out / f"{stem}_test.jsonl"
    for path, rows in zip(paths, (train, test)):
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--language", choices=LANGUAGES, default="en")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    train_path, test_path = write_faq(args.facts, args.language, args.seed, args.out)
    print(train_path)
    print(test_path)


if __name__ == "__main__":
    main()
