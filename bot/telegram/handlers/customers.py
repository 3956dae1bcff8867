"""Customers in private chats: a link (/start c_…) opens a session; their texts get the active version's answer
with 👍/👎, an unsure one goes to the team; the team's answers come back; /forget. The router runs before the
team's handlers (group -1) and stops there for customers, so no team command ever reaches them."""

from __future__ import annotations

import asyncio
import logging
import re

from telegram import ReplyParameters, Update
from telegram.constants import ChatType
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import ApplicationHandlerStop, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, button_invalid, callback_match, current_assistant, keyboard, reply,
                                 role_at_least, short, split_text, store_of, tr, tr_error, with_thread_store)
from bot.telegram.handlers.publish import link_group
from bot.telegram.streaming import AnswerStream
from bot.telegram.texts import pick_language, t
from storage import DuplicateExample, NotFound, StorageError
from storage.customers import TOKEN_PREFIX
from storage.records import Customer
from tuning.customers import CustomerLimits, RateLimiter, answer_customer, asked_today

log = logging.getLogger("tunebot.telegram")
# Callback data is untrusted: only this shape is accepted (fullmatch), and the message must be this customer's.
CUSTOMER_FEEDBACK = re.compile(rf"cf:([ud]):({ID})")
START_TOKEN = re.compile(rf"/start(?:@\w+)?\s+({re.escape(TOKEN_PREFIX)}[A-Za-z0-9_-]{{1,62}})\s*")
DELIVER_EVERY_S = 15  # the repeating retry of team answers that could not be sent at once
ANSWERS = "customer_answers"  # bot_data key: the customers' answers being made in the background


def in_background(context: ContextTypes.DEFAULT_TYPE, coroutine, update: Update) -> None:
    """Make a customer's answer off the update's slot: PTB handles a few updates at once (concurrent_updates), and
    fifty customers waiting on a slow model must not hold them while the team's updates (and the other customers'
    "…") wait behind. Errors reach the error handler with the update; bot_data[ANSWERS] holds what is running."""
    import warnings

    with warnings.catch_warnings():  # in-process tests do not start the Application: they await ANSWERS instead
        warnings.filterwarnings("ignore", message="Tasks created via `Application.create_task`")
        task = context.application.create_task(coroutine, update=update, name="customer-answer")
    running = context.bot_data.setdefault(ANSWERS, set())
    running.add(task)
    task.add_done_callback(running.discard)


def limiter_of(context: ContextTypes.DEFAULT_TYPE) -> RateLimiter:
    """The process's per-customer rate limiter (built from the settings on first use)."""
    limiter = context.bot_data.get("customer_limiter")
    if limiter is None:
        s = app_of(context).settings
        limiter = context.bot_data["customer_limiter"] = RateLimiter(CustomerLimits(
            per_minute=s.customer_per_minute, per_day=s.customer_per_day, max_chars=s.max_field_chars))
    return limiter


def _language(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    user = update.effective_user
    return pick_language(user.language_code if user else None, app_of(context).settings.default_language)


async def route(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Group -1: a customer's update is handled here and goes no further; anyone else's goes on to the team's."""
    if not isinstance(update, Update):
        return
    chat, user = update.effective_chat, update.effective_user
    if chat is None or user is None:
        return
    if chat.type in (ChatType.GROUP, ChatType.SUPERGROUP):
        if await route_group(update, context):
            raise ApplicationHandlerStop
        return
    if chat.type != ChatType.PRIVATE or user.is_bot:
        return
    store = store_of(context)
    message = update.message
    if message is not None and message.text and (match := START_TOKEN.fullmatch(message.text)):
        await customer_start(update, context, match.group(1))
        raise ApplicationHandlerStop
    if store.list_assistants(user_id=user.id):  # the team: their own handlers
        return
    if _command(update) == "start" and len(message.text.split()) > 1:
        return  # another link (an invite to a team): onboarding redeems it
    customer = store.link_customer(user.id)
    if customer is None:
        if not store.is_customer_anywhere(user.id) or _command(update) in ("start", "create", "lang", "forget"):
            return  # a stranger (or an old customer starting something else): onboarding answers
        if update.callback_query:
            await update.callback_query.answer()
        if update.message is not None:
            await reply(update, tr(update, context, "customer_unavailable"))
        raise ApplicationHandlerStop
    await customer_update(update, context, customer)
    raise ApplicationHandlerStop


def _command(update: Update) -> str | None:
    """The command a message gives ("start" for "/start@TunebotTestBot x"), "" for a lone "/", else None."""
    text = update.message.text if update.message is not None and update.message.text else ""
    if not text.startswith("/"):
        return None
    return (text[1:].split(maxsplit=1) or [""])[0].split("@")[0].lower()


async def customer_start(update: Update, context: ContextTypes.DEFAULT_TYPE, token: str) -> None:
    """/start c_…: open (or reopen) this user's customer session with that assistant."""
    store = store_of(context)
    user = update.effective_user
    publication = store.publication_by_token(token)
    if publication is None or not publication.answers_on("link"):
        await reply(update, tr(update, context, "customer_link_invalid"))
        return
    assistant = store.get_assistant(publication.assistant_id)
    if store.list_assistants(user_id=user.id):
        await reply(update, tr(update, context, "customer_team_member", name=assistant.name))
        return
    store.upsert_user(user.id, name=user.full_name)
    store.open_customer(assistant.id, user.id, update.effective_chat.id, language=_language(update, context))
    await greet(update, context, assistant.id)


async def greet(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int) -> None:
    """The owner's greeting, or the standard welcome naming the assistant."""
    store = store_of(context)
    greeting = store.get_publication(assistant_id).greeting
    await reply(update, greeting or tr(update, context, "customer_welcome",
                                       name=store.get_assistant(assistant_id).name))


async def customer_update(update: Update, context: ContextTypes.DEFAULT_TYPE, customer: Customer) -> None:
    """Everything a link customer sends: a question, a 👍/👎, /forget, /help; nothing of the team's side."""
    if update.callback_query is not None:
        await feedback_button(update, context)
        return
    message = update.message
    if message is None:  # an edit of an earlier question (answered already), or another kind of update
        return
    if message.text is None:
        await reply(update, tr(update, context, "customer_text_only"))
        return
    name = _command(update)
    if name == "forget":
        await forget(update, context)
    elif name == "help":
        await reply(update, tr(update, context, "customer_help"))
    elif name == "start":
        await greet(update, context, customer.assistant_id)
    elif name is not None:
        await reply(update, tr(update, context, "customer_no_commands"))
    else:
        await answer_text(update, context, customer)


async def answer_text(update: Update, context: ContextTypes.DEFAULT_TYPE, customer: Customer,
                      question: str | None = None) -> None:
    """A customer's question: within the limits, the answer streams in (private chats) or comes as a reply
    (groups); unsure -> the team gets it."""
    store = store_of(context)
    question = (update.message.text if question is None else question).strip()
    if not question:
        return
    limiter = limiter_of(context)
    if len(question) > limiter.limits.max_chars:
        await reply(update, tr(update, context, "customer_too_long", n=limiter.limits.max_chars))
        return
    verdict = limiter.admit(customer.assistant_id, customer.user_id, asked_today(store, customer))
    if verdict is not None:
        await reply(update, tr(update, context, f"customer_rate_{verdict}"))
        return

    async def answer() -> None:
        try:
            await _stream(update, context, customer, question)
        finally:
            limiter.done(customer.assistant_id, customer.user_id)

    in_background(context, answer(), update)


async def _stream(update: Update, context: ContextTypes.DEFAULT_TYPE, customer: Customer, question: str) -> None:
    app = app_of(context)
    assistant = store_of(context).get_assistant(customer.assistant_id)
    engine = app.engine_for(assistant.base_model or app.settings.base_model)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    abstain_text = tr(update, context, "customer_abstain")

    def produce(thread_store):
        try:
            return answer_customer(thread_store, engine, customer, question, abstain_text=abstain_text,
                                   indexes=app.indexes,
                                   on_piece=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

    producer = asyncio.create_task(with_thread_store(context, produce))
    private = update.effective_chat.type == ChatType.PRIVATE
    stream = AnswerStream(context.bot, update.effective_chat, context.bot_data, drafts=app.settings.telegram_drafts,
                          draft_id=update.message.message_id, placeholder="…") if private else None
    if stream is not None:  # its placeholder shows at once; "typing" as well would be one more request to wait
        await stream.start()  # for under the bot's rate limit (the limit of 50 customers asking at once)
    else:
        await update.effective_chat.send_action("typing")
    text = ""
    while (piece := await pieces.get()) is not None:
        text += piece
        if stream is not None:
            await stream.grow(text)
    answer = await producer
    store = store_of(context)
    unanswered_id, abstained = answer.unanswered_id, answer.abstained
    if not abstained and not answer.text.strip() and answer.message_id is not None:
        # the model said nothing: the customer is told what an unsure answer tells them, and that is true
        item = await with_thread_store(context, lambda s: s.queue_customer_question(answer.message_id))
        unanswered_id, abstained = (item.id if item else None), True
    rows = None if abstained or answer.message_id is None else [
        [("👍", f"cf:u:{answer.message_id}"), ("👎", f"cf:d:{answer.message_id}")]]
    final, markup = abstain_text if abstained else answer.text, keyboard(rows) if rows else None
    if stream is not None:
        sent = await stream.finish(final, markup)
    else:  # a group: one reply to the question, not a message edited as it grows in front of everyone
        sent = await update.message.reply_text(split_text(final)[0], reply_markup=markup)
    if sent is not None and answer.message_id is not None:
        store.set_telegram_message(answer.message_id, sent.message_id)
    if unanswered_id is not None:
        store.set_unanswered_reply_to(unanswered_id, update.message.message_id)


async def feedback_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """👍 or 👎 under a customer's answer: only on an answer in this user's own customer conversation, in this
    chat; 👎 queues the question for the team like an unsure one."""
    query = update.callback_query
    await query.answer()
    match = callback_match(update, CUSTOMER_FEEDBACK)
    store = store_of(context)
    customer = None
    if match is not None and (customer_id := store.message_customer(int(match.group(2)))) is not None:
        customer = store.get_customer(customer_id)
    if (customer is None or customer.user_id != update.effective_user.id
            or customer.chat_id != update.effective_chat.id
            or store.get_message(int(match.group(2)))["role"] != "assistant"):
        await button_invalid(update, context)
        return
    message_id = int(match.group(2))
    if match.group(1) == "u":
        store.set_feedback(message_id, "up")
        await reply(update, tr(update, context, "customer_thanks"))
        return
    store.set_feedback(message_id, "down")
    await with_thread_store(context, lambda s: s.queue_customer_question(message_id))
    await reply(update, tr(update, context, "customer_down_queued"))


async def team_feedback_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A customer's 👍/👎 data from anyone the router did not take as a customer: never valid."""
    await update.callback_query.answer()
    await button_invalid(update, context)


async def forget(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/forget: delete what this user sent as a customer (every assistant) and the answers to it."""
    uid = update.effective_user.id
    counts = await with_thread_store(context, lambda s: s.forget_customer(uid))
    await reply(update, tr(update, context, "customer_forgotten", n=counts["messages"]))


# ------------------------------------------------------------------------ groups
def _addressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> tuple[bool, str, int | None]:
    """Whether a group message speaks to the bot (mentions it, or replies to its message), the text without the
    mention, and the id of the bot's message it replies to (None when it does not)."""
    message, bot = update.message, context.bot
    text = message.text or ""
    replied = message.reply_to_message
    to_bot = replied.message_id if replied is not None and replied.from_user is not None and \
        replied.from_user.id == bot.id else None
    # the @username as written (Telegram's entity offsets count UTF-16 units; the text itself is enough)
    mention = re.compile(rf"@{re.escape(bot.username)}\b", re.IGNORECASE) if bot.username else None
    mentioned = bool(mention and mention.search(text))
    if mention:
        text = mention.sub(" ", text)
    return mentioned or to_bot is not None, " ".join(text.split()), to_bot


async def route_group(update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
    """A group linked to a published assistant: answer what mentions the bot or replies to it; a team member's
    reply to the bot's answer is a pending correction; other chatter is ignored. Commands go to the team's handlers
    (an owner's /publish links a group). Returns whether the update was handled here."""
    store = store_of(context)
    chat, user, message = update.effective_chat, update.effective_user, update.message
    if message is not None and any(m.id == context.bot.id for m in message.new_chat_members or ()):
        await bot_added(update, context)
        return True
    member = update.my_chat_member
    if member is not None and member.new_chat_member.status in ("left", "kicked"):
        store.unlink_group(chat.id)  # removed from the group: nothing more to answer there
        return True
    assistant_id = store.group_assistant(chat.id)
    if assistant_id is None:
        return False
    publication = store.get_publication(assistant_id)
    if update.callback_query is not None:
        if callback_match(update, CUSTOMER_FEEDBACK) is None:
            return False
        await feedback_button(update, context)
        return True
    if message is None or user.is_bot:  # edits, other bots: nothing to say in a customers' group
        return True
    if message.text and message.text.startswith("/"):
        return False
    if message.text is None or publication is None or not publication.answers_on("groups"):
        return True
    addressed, question, to_bot = _addressed(update, context)
    if not addressed or not question:
        return True
    if to_bot is not None and role_at_least(store.role_of(assistant_id, user.id), "expert"):
        await group_correction(update, context, assistant_id, to_bot, question)
        return True
    if store.role_of(assistant_id, user.id) is not None:  # the team asks in /chat, not in front of customers
        return True
    customer = store.find_customer(assistant_id, user.id, chat.id) or store.open_customer(
        assistant_id, user.id, chat.id, channel="groups", language=_language(update, context))
    await answer_text(update, context, customer, question)
    return True


async def bot_added(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Added to a group: by an owner, their current assistant answers there (when its groups channel is on);
    by anyone else, nothing changes."""
    assistant, role = current_assistant(update, context)
    if assistant is not None and role == "owner":
        await link_group(update, context, assistant)


async def group_correction(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int,
                           tg_message_id: int, correction: str) -> None:
    """An expert's reply to the bot's answer in a customers' group: the right answer, saved as pending."""
    store = store_of(context)
    message_id = store.answer_by_telegram_id(update.effective_chat.id, tg_message_id)
    question = store.question_before(message_id) if message_id is not None else None
    if not question:
        return
    try:
        example = store.add_example(assistant_id, question, correction, source="feedback", status="pending",
                                    author_id=update.effective_user.id)
    except DuplicateExample:
        example = store.add_example(assistant_id, question, correction, source="feedback", status="pending",
                                    author_id=update.effective_user.id, allow_duplicate=True)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    store.set_feedback(message_id, "down", correction=correction, correction_example_id=example.id)
    await update.message.reply_text(tr(update, context, "customer_group_correction", id=example.id))


# ------------------------------------------------------------ answers going back
async def deliver_team_answers(context: ContextTypes.DEFAULT_TYPE) -> int:
    """Send each customer the team's answers to their questions, in the chat where they asked; each answer is
    claimed before it is sent, so it goes out once; a passing failure leaves it for the next run. Returns how
    many were sent. Nothing goes out while the assistant is unpublished."""
    pending = await with_thread_store(context, lambda s: s.undelivered_team_answers())
    sent = 0
    for item, answer, customer in pending:
        publication = store_of(context).get_publication(customer.assistant_id)
        if publication is None or not publication.active:
            continue
        if not await with_thread_store(context, lambda s, i=item.id: s.claim_delivery(i)):
            continue
        lang = customer.language or app_of(context).settings.default_language
        text = t(lang, "customer_team_answer", question=short(item.question, 300), answer=answer)
        extra = {}
        if item.reply_to_message_id:
            extra["reply_parameters"] = ReplyParameters(item.reply_to_message_id, allow_sending_without_reply=True)
        if customer.business_connection_id:
            extra["business_connection_id"] = customer.business_connection_id
        try:
            for i, part in enumerate(split_text(text)):
                await context.bot.send_message(customer.chat_id, part, **(extra if i == 0 else {
                    k: v for k, v in extra.items() if k != "reply_parameters"}))
            sent += 1
        except (Forbidden, BadRequest) as exc:  # blocked the bot, or the chat is gone: no retry would help
            log.info("could not send the team's answer #%s to chat %s: %s", item.id, customer.chat_id, exc)
        except TelegramError as exc:
            log.warning("could not send the team's answer #%s now, will retry: %s", item.id, exc)
            await with_thread_store(context, lambda s, i=item.id: s.release_delivery(i))
    return sent


async def deliver_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """PTB repeating job: the team's answers not yet sent (Telegram was unreachable, or the bot restarted)."""
    try:
        await deliver_team_answers(context)
    except NotFound:  # a customer or assistant removed meanwhile: the next run skips it
        log.info("a team answer's customer disappeared while it was being sent")


def handlers() -> list:
    """The team's side of customer buttons and commands (the router, group -1, takes the customers')."""
    return [
        CommandHandler("forget", forget),
        CallbackQueryHandler(team_feedback_button, pattern=r"^cf:"),
    ]
