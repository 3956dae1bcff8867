// telegram-test-api 4.2.1 wrapped so that python-telegram-bot 22 can talk to it.
// Usage: node server.js --port 9000 [--host 127.0.0.1]
// Fixes over the stock package: getMe with is_bot, dates in seconds, chat_instance on callback
// queries, true results for answerCallbackQuery/sendChatAction, setMyCommands/getMyCommands per scope and
// language_code, edited messages
// returned by editMessageText, file routes (sendDocument, sendPhoto, getFile, /file/bot...),
// sendMessageDraft (kept for tests to read; /refuseDrafts makes it 404 like an older server), short long-polling on getUpdates, and a /userDocument route for the test user.
// Telegram Business: /userUpdate queues any update as given (business_connection, business_message,
// edited_business_message, deleted_business_messages); connections are remembered, getBusinessConnection
// returns them, and sendMessage with a business_connection_id fails as Telegram does when the connection is
// unknown, disabled or has no right to reply. See README.md.
'use strict';

const http = require('http');
const crypto = require('crypto');
const express = require('express');
const multer = require('multer');
const { TelegramServer } = require('telegram-test-api/lib/telegramServer');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const port = Number(arg('port', process.env.PORT || 9000));
const host = arg('host', '127.0.0.1');
const tg = new TelegramServer({ port, host, storeTimeout: 24 * 3600 });
const upload = multer({ storage: multer.memoryStorage(), limits: { fileSize: 200 * 1024 * 1024 } });
const files = new Map(); // file_id -> {buffer, name, mime}
const drafts = []; // sendMessageDraft calls, for tests to read
const businessConnections = new Map(); // `${token}:${id}` -> the business_connection as last sent
const failingSends = new Map(); // `${token}:${chat_id}` -> {status, times}: sendMessage fails like this next

const BOT = { id: 666, is_bot: true, first_name: 'Tunebot Test', username: 'TunebotTestBot' };

function seconds(value) {
  const n = Number(value);
  return n > 1e11 ? Math.floor(n / 1000) : n;
}

function storeFile(buffer, name, mime) {
  const fileId = `f${files.size + 1}_${crypto.randomBytes(6).toString('hex')}`;
  files.set(fileId, { buffer, name, mime });
  return { file_id: fileId, file_unique_id: fileId, file_name: name, mime_type: mime, file_size: buffer.length };
}

function botMessageResult(msg) {
  // The stock result has `date` in ms and a chat without a real type; fix both.
  return {
    ...msg,
    from: BOT,
    date: seconds(msg.date),
    chat: { id: Number(msg.chat_id), type: 'private', first_name: 'User' },
  };
}

function storedAsMessage(update) {
  const m = update.message;
  return botMessageResult({ ...m, message_id: update.messageId, date: update.time });
}

const front = express();
front.use((req, res, next) => {
  res.ok = (result) => res.json({ ok: true, result });
  res.fail = (code, description) => res.status(code).json({ ok: false, error_code: code, description });
  next();
});
// PTB sends form-encoded fields (JSON values as strings) or multipart when a file is attached.
front.use(express.json({ limit: '300mb' }));
front.use(express.urlencoded({ extended: true, limit: '300mb' }));

const api = express.Router({ mergeParams: true });
api.all('/getMe', (req, res) => res.ok(BOT));
for (const m of ['answerCallbackQuery', 'sendChatAction',
  'setChatMenuButton', 'setMyDescription', 'setMyShortDescription', 'close', 'logOut']) {
  api.all(`/${m}`, (req, res) => res.ok(true));
}
// The command menus, per token, scope and language_code, as Telegram keeps them.
const menus = new Map();
function parsed(value, fallback) {
  if (value === undefined || value === null || value === '') return fallback;
  if (typeof value !== 'string') return value;
  try { return JSON.parse(value); } catch (e) { return fallback; }
}
function menuKey(req) {
  const scope = parsed(req.body.scope, { type: 'default' });
  return JSON.stringify([req.params.token, scope, req.body.language_code || '']);
}
api.all('/setMyCommands', (req, res) => {
  const commands = parsed(req.body.commands, null);
  if (!Array.isArray(commands)) return res.fail(400, 'Bad Request: commands must be an array');
  menus.set(menuKey(req), commands.map((c) => ({ command: String(c.command), description: String(c.description) })));
  res.ok(true);
});
api.all('/deleteMyCommands', (req, res) => {
  menus.delete(menuKey(req));
  res.ok(true);
});
api.all('/getMyCommands', (req, res) => res.ok(menus.get(menuKey(req)) || []));
api.all('/deleteWebhook', (req, res) => {
  tg.deleteWebhook(req.params.token);
  res.ok(true);
});
function businessRefusal(req) {
  // Why Telegram would refuse to send on behalf of a business account (null when it would send).
  const id = req.body.business_connection_id;
  if (id === undefined || id === null || id === '') return null;
  const conn = businessConnections.get(`${req.params.token}:${id}`);
  if (!conn) return 'Bad Request: business connection not found';
  if (!conn.is_enabled) return 'Bad Request: BUSINESS_CONNECTION_NOT_ALLOWED';
  const canReply = conn.rights ? conn.rights.can_reply : conn.can_reply;
  if (!canReply) return 'Bad Request: BUSINESS_CONNECTION_NOT_ALLOWED';
  if (String(conn.user_chat_id) === String(req.body.chat_id)) return 'Bad Request: BUSINESS_PEER_INVALID';
  return null;
}
api.all('/getBusinessConnection', (req, res) => {
  const conn = businessConnections.get(`${req.params.token}:${req.body.business_connection_id}`);
  if (!conn) return res.fail(400, 'Bad Request: business connection not found');
  res.ok(conn);
});
api.all('/sendMessage', (req, res) => {
  if (!req.body.text) return res.fail(400, 'Bad Request: message text is empty');
  if (String(req.body.text).length > 4096) return res.fail(400, 'Bad Request: message is too long');
  const refusal = businessRefusal(req);
  if (refusal) return res.fail(400, refusal);
  const failing = failingSends.get(`${req.params.token}:${req.body.chat_id}`);
  if (failing && failing.times > 0) {
    failing.times -= 1;
    return res.fail(failing.status, failing.status === 403 ? 'Forbidden: bot was blocked by the user'
      : 'Internal Server Error');
  }
  res.ok(botMessageResult(tg.addBotMessage(req.body, req.params.token)));
});
const refusingDrafts = new Set(); // tokens whose server acts as one before Bot API 9.3 (no sendMessageDraft)
api.all('/sendMessageDraft', (req, res) => {
  if (refusingDrafts.has(req.params.token)) return res.fail(404, 'Not Found');
  const draftId = Number(req.body.draft_id);
  if (!Number.isInteger(draftId) || draftId === 0) return res.fail(400, 'Bad Request: draft_id must be non-zero');
  if (String(req.body.text || '').length > 4096) return res.fail(400, 'Bad Request: text is too long');
  drafts.push({ token: req.params.token, chat_id: Number(req.body.chat_id), draft_id: draftId,
    text: req.body.text || '', time: Date.now() });
  res.ok(true);
});
function editRoute(kind) {
  return (req, res) => {
    const body = TelegramServer.normalizeMessage({ ...req.body });
    const update = tg.storage.botMessages.find((u) => String(u.messageId) === String(body.message_id)
      && String(u.message.chat_id) === String(body.chat_id));
    if (!update) return res.fail(400, 'Bad Request: message to edit not found');
    if (kind === 'text') {
      if (String(body.text || '').length > 4096) return res.fail(400, 'Bad Request: message is too long');
      if (update.message.text === body.text
          && JSON.stringify(update.message.reply_markup || null) === JSON.stringify(body.reply_markup || null)) {
        return res.fail(400, 'Bad Request: message is not modified');
      }
      if (!('reply_markup' in body)) body.reply_markup = undefined; // Telegram drops the keyboard too
      tg.editMessageText(body);
      update.message = { ...update.message, ...body };
    } else if (kind === 'caption') {
      update.message = { ...update.message, ...body };
    } else {
      update.message = { ...update.message, reply_markup: body.reply_markup };
    }
    update.edits = (update.edits || 0) + 1;
    update.editedAt = Date.now();
    res.ok(storedAsMessage(update));
  };
}
api.all('/editMessageText', editRoute('text'));
api.all('/editMessageCaption', editRoute('caption'));
api.all('/editMessageReplyMarkup', editRoute('markup'));

function sendFile(field) {
  return [upload.any(), (req, res) => {
    const body = { ...req.body };
    const part = (req.files || []).find((f) => f.fieldname === field) || (req.files || [])[0];
    let info;
    if (part) {
      info = storeFile(part.buffer, part.originalname || field, part.mimetype);
    } else if (body[field] && files.has(String(body[field]))) {
      const f = files.get(String(body[field]));
      info = { file_id: String(body[field]), file_unique_id: String(body[field]), file_name: f.name,
        mime_type: f.mime, file_size: f.buffer.length };
    } else {
      return res.fail(400, `Bad Request: there is no ${field} in the request`);
    }
    delete body[field];
    if (field === 'photo') {
      body.photo = [{ file_id: info.file_id, file_unique_id: info.file_unique_id, file_size: info.file_size,
        width: 640, height: 480 }];
    } else {
      body.document = info;
    }
    res.ok(botMessageResult(tg.addBotMessage(body, req.params.token)));
  }];
}
api.post('/sendDocument', ...sendFile('document'));
api.post('/sendPhoto', ...sendFile('photo'));
api.all('/getFile', (req, res) => {
  const fileId = String(req.body.file_id || req.query.file_id);
  const f = files.get(fileId);
  if (!f) return res.fail(400, 'Bad Request: invalid file_id');
  res.ok({ file_id: fileId, file_unique_id: fileId, file_size: f.buffer.length, file_path: `files/${fileId}` });
});
api.all('/getUpdates', async (req, res) => {
  // Stock getUpdates ignores offset and returns at once; wait briefly for an update instead of
  // making the bot spin, and fix dates and callback queries on the way out.
  const token = req.params.token;
  const waitMs = Math.min(Number(req.body.timeout || req.query.timeout || 0), 1) * 1000;
  const pending = () => tg.storage.userMessages.some((u) => u.botToken === token && !u.isRead);
  let gone = false; // a client that hung up (a bot shutting down) must not consume updates
  res.on('close', () => { if (!res.writableEnded) gone = true; });
  if (!pending() && waitMs > 0) {
    await new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        for (const e of ['AddedUserMessage', 'AddedUserCommand', 'AddedUserCallbackQuery']) tg.off(e, done);
        res.off('close', done);
        resolve();
      };
      const timer = setTimeout(done, waitMs);
      for (const e of ['AddedUserMessage', 'AddedUserCommand', 'AddedUserCallbackQuery']) tg.on(e, done);
      res.on('close', done);
    });
  }
  if (gone || res.writableEnded) return;
  const unread = tg.storage.userMessages.filter((u) => u.botToken === token && !u.isRead);
  for (const u of unread) u.isRead = true;
  const updates = unread.map((u) => (u.raw ? { update_id: u.updateId, ...u.raw } : TelegramServer.formatUpdate(u)))
    .map((u) => {
    if (u.message) u.message = { ...u.message, date: seconds(u.message.date) };
    if (u.callback_query) {
      const cq = u.callback_query;
      cq.chat_instance = cq.chat_instance || String(cq.message && cq.message.chat ? cq.message.chat.id : cq.from.id);
      if (cq.message) cq.message = { ...cq.message, date: seconds(cq.message.date) };
    }
    return u;
  });
  res.ok(updates);
});
front.use('/bot:token', api);
front.get('/file/bot:token/files/:fileId', (req, res) => {
  const f = files.get(req.params.fileId);
  if (!f) return res.status(404).end();
  res.type(f.mime || 'application/octet-stream').send(f.buffer);
});

// Routes for the simulated user (next to the stock /sendMessage, /sendCommand, /sendCallback ...).
front.post('/userDocument', (req, res) => {
  const { token, filename, mime, content_base64: content } = req.body;
  const info = storeFile(Buffer.from(content, 'base64'), filename, mime || 'application/octet-stream');
  const message = { ...req.body.message, document: info };
  if (req.body.caption) message.caption = req.body.caption;
  tg.addUserMessage({ ...message, botToken: token });
  res.ok(info);
});
// Any update as Telegram would send it (business_connection, business_message, ...), queued for getUpdates.
// A business_message gets a message_id and date when it has none; a business_connection is remembered.
front.post('/userUpdate', (req, res) => {
  const { token, update } = req.body;
  if (!token || !update || typeof update !== 'object') return res.fail(400, 'token and update are required');
  const raw = { ...update };
  for (const kind of ['business_message', 'edited_business_message']) {
    if (raw[kind]) {
      raw[kind] = { date: Math.floor(Date.now() / 1000), ...raw[kind] };
      if (raw[kind].message_id === undefined) raw[kind].message_id = tg.messageId++;
    }
  }
  if (raw.business_connection) {
    raw.business_connection = { date: Math.floor(Date.now() / 1000), ...raw.business_connection };
    businessConnections.set(`${token}:${raw.business_connection.id}`, raw.business_connection);
  }
  const message = raw.business_message || raw.edited_business_message;
  // messageId: what history readers use as a mark (the newest message id given out so far)
  const entry = { time: Date.now(), botToken: token, updateId: tg.updateId++, isRead: false, raw,
    messageId: message ? message.message_id : Math.max(tg.messageId - 1, 0) };
  tg.storage.userMessages.push(entry);
  tg.emit('AddedUserMessage');
  res.ok({ update_id: entry.updateId, ...raw });
});
// The next `times` sendMessage calls to chat_id fail with `status` (500: a passing fault; 403: blocked by the user).
front.post('/failSends', (req, res) => {
  const { token, chat_id: chatId, status, times } = req.body;
  failingSends.set(`${token}:${chatId}`, { status: Number(status) || 500, times: Number(times) || 1 });
  res.ok(true);
});
front.post('/getDrafts', (req, res) => res.ok(drafts.filter((d) => d.token === req.body.token)));
front.post('/refuseDrafts', (req, res) => {
  if (req.body.refuse) refusingDrafts.add(req.body.token); else refusingDrafts.delete(req.body.token);
  res.ok(true);
});
front.post('/getBotFile', (req, res) => {
  const f = files.get(String(req.body.file_id));
  if (!f) return res.fail(404, 'no such file');
  res.ok({ name: f.name, mime: f.mime, content_base64: f.buffer.toString('base64') });
});
front.post('/reset', (req, res) => {
  tg.storage.userMessages = [];
  tg.storage.botMessages = [];
  res.ok(true);
});
front.use(tg.webServer);

const server = http.createServer(front);
server.listen(port, host, () => {
  process.stdout.write(`emulator listening on http://${host}:${server.address().port}\n`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
