"""CLI commands for customers: `publish` (the customer link, its channels and greeting) and what `stats
--customers` shows."""

from __future__ import annotations

import argparse
import json

from storage.records import CHANNELS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `publish` to the `tunebot` parser."""
    pub = subparsers.add_parser(
        "publish", help="offer an assistant to customers (a link, groups, business chats)",
        description="Publish an assistant for customers: it gets a customer link (t.me/<bot>?start=<token>) "
                    "that opens a chat where the active version answers and unsure questions go to the experts. "
                    "Without options: publish (or show) it. Unpublishing or a new link stops answers at once.")
    pub.add_argument("--assistant", required=True, metavar="NAME")
    state = pub.add_mutually_exclusive_group()
    state.add_argument("--unpublish", action="store_true", help="stop answering customers on every channel")
    state.add_argument("--revoke", action="store_true", help="make a new link; the old one answers nothing")
    state.add_argument("--show", action="store_true", help="only show the publication, change nothing")
    for channel in CHANNELS:
        pub.add_argument(f"--{channel}", choices=("on", "off"), default=None,
                         help=f"answer customers through the {channel} channel, or not")
    pub.add_argument("--greeting", default=None, metavar="TEXT",
                     help="what customers see when they open the link ('' for the standard one)")
    pub.add_argument("--bot", default=None, metavar="USERNAME", help="the bot's username, to print the full link")
    pub.add_argument("--json", action="store_true", help="print the publication as JSON")
    pub.set_defaults(func=cmd_publish)


def cmd_publish(args, app) -> int:
    """Publish, unpublish, regenerate the link, switch channels and set the greeting; print the result."""
    from bot.cli import CommandError
    from tuning.customers import customer_link

    store = app.store
    assistant = store.assistant_by_name(args.assistant)
    if args.show:
        publication = store.get_publication(assistant.id)
        if publication is None:
            raise CommandError(f"assistant {assistant.name!r} is not published; run `tunebot publish --assistant "
                               f"{assistant.name}`")
    elif args.unpublish:
        publication = store.unpublish(assistant.id)
    elif args.revoke:
        publication = store.regenerate_token(assistant.id)
    else:
        publication = store.get_publication(assistant.id) or store.publish(assistant.id)
        if not publication.active and not any(getattr(args, c) for c in CHANNELS) and args.greeting is None:
            publication = store.publish(assistant.id)
    if not args.show:
        for channel in CHANNELS:
            if getattr(args, channel) is not None:
                publication = store.set_channel(assistant.id, channel, getattr(args, channel) == "on")
        if args.greeting is not None:
            publication = store.set_greeting(assistant.id, args.greeting)
    link = customer_link(args.bot, publication.token)
    if args.json:
        print(json.dumps({"assistant": assistant.name, "active": bool(publication.active), "token": publication.token,
                          "url": link, **{c: bool(getattr(publication, c)) for c in CHANNELS},
                          "greeting": publication.greeting}, ensure_ascii=False, indent=2))
        return 0
    state = "published" if publication.active else "unpublished (answers nothing)"
    channels = ", ".join(f"{c} {'on' if getattr(publication, c) else 'off'}" for c in CHANNELS)
    print(f"assistant {assistant.name}: {state}\n  link      {link}\n  channels  {channels}\n"
          f"  greeting  {publication.greeting or '(the standard one)'}")
    return 0


def print_customer_stats(app, assistant, *, days: int, as_json: bool) -> int:
    """`tunebot stats --customers`: customers' questions, answers, feedback and the team's answers."""
    from bot.cli import CommandError

    if days < 1:
        raise CommandError("--days must be at least 1")
    from tuning.customers import customer_report

    stats = customer_report(app.store, assistant.id, days=days, indexes=app.indexes)
    if as_json:
        print(json.dumps({"assistant": assistant.name, **stats}, ensure_ascii=False, indent=2))
        return 0
    print(f"assistant {assistant.name}: customers, last {days} days")
    print(f"  questions {stats['questions']}, answered {stats['answered']}, don't know {stats['dont_know']}"
          f" (share answered {stats['share_answered'] if stats['share_answered'] is not None else '—'})")
    print(f"  feedback  👍 {stats['thumbs_up']} · 👎 {stats['thumbs_down']}")
    wait = stats["team_answer_minutes_median"]
    print(f"  team answers {stats['team_answers']} (median wait {'—' if wait is None else f'{wait:g} min'}), "
          f"waiting {stats['open_customer_questions']}")
    for row in stats["per_day"]:
        print(f"  {row['day']}  {row['questions']:>5} asked  {row['answered']:>5} answered  "
              f"{row['dont_know']:>5} don't know")
    for group in stats["frequent_unanswered"]:
        print(f"  ×{group['count']}  {group['question']}" + (f"  ({group['wordings']} wordings)"
                                                           if group["wordings"] > 1 else ""))
    return 0
