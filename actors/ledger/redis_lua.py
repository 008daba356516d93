"""The Redis ledger's scripts: each ledger call is one Lua script, so it is atomic, as one
SQLite transaction is.

Keys, under the prefix ``P`` = ``{<name>}:`` (``fk`` = a flow's key, ``k`` = ``fk .. id``):

- ``P r:<k>``   hash, one run: ev (msgpack event), st, at, se, wk, nx, er, tb, fr, cr, up, ba,
  and fk, id, t, f (its own key parts)
- ``P s:<state>`` zset of ``k`` by created, per run state
- ``P q:<fk>``  zset of pending event ids of one flow by created (ties: by id)
- ``P a`` / ``P l:<fk>`` zsets of all runs (``k``) / one flow's runs (ids) by created
- ``P c`` hash of counters (field ``fk .. name``); ``P n`` hash of run counts (``fk .. state``)
- ``P f`` hash of known flows (``fk`` → last event time or ""); ``P p`` set of paused flows
- ``P j`` list of rejections, newest first, trimmed; ``P meta`` marks a written ledger
- ``P k:<token>`` the answer of a write call, kept 10 minutes: a call resent after a lost
  connection with the same token gets the first answer instead of running again

Arguments and answers of write scripts are msgpack (``cmsgpack``); floats travel as strings
(Lua would round them), integers as numbers.
"""

from __future__ import annotations

PRELUDE = """
local P = KEYS[1]
local A = cmsgpack.unpack(ARGV[1])
local function count(fk, state, by)
  if redis.call('HINCRBY', P .. 'n', fk .. state, by) == 0 then
    redis.call('HDEL', P .. 'n', fk .. state)
  end
end
local function move(k, fk, id, cr, old, new)
  if old then
    redis.call('ZREM', P .. 's:' .. old, k)
    count(fk, old, -1)
  end
  redis.call('ZADD', P .. 's:' .. new, cr, k)
  count(fk, new, 1)
  if old == 'pending' then redis.call('ZREM', P .. 'q:' .. fk, id) end
  if new == 'pending' then redis.call('ZADD', P .. 'q:' .. fk, cr, id) end
end
local function set_or_drop(rk, field, value)
  if value then redis.call('HSET', rk, field, value) else redis.call('HDEL', rk, field) end
end
"""

#: write scripts: answer once per token
ONCE_BEGIN = """
local done = redis.call('GET', P .. 'k:' .. A.token)
if done then return done end
"""
ONCE_END = """
local answer = cmsgpack.pack(out)
redis.call('SET', P .. 'k:' .. A.token, answer, 'EX', 600)
return answer
"""

CLAIM = """
local out, accepted = {}, {}
for i, it in ipairs(A.items) do
  local fk, id = it[1], it[2]
  local k = fk .. id
  local rk = P .. 'r:' .. k
  if redis.call('EXISTS', rk) == 1 then
    out[i] = false
  else
    redis.call('HSET', rk, 'ev', it[3], 'st', 'pending', 'at', 0, 'se', 0, 'cr', A.now,
      'up', A.now, 'fk', fk, 'id', id, 't', it[4], 'f', it[5])
    move(k, fk, id, A.now, false, 'pending')
    redis.call('ZADD', P .. 'a', A.now, k)
    redis.call('ZADD', P .. 'l:' .. fk, A.now, id)
    accepted[fk] = (accepted[fk] or 0) + 1
    out[i] = true
  end
end
for _, fl in ipairs(A.flows) do
  local fk, seen = fl[1], fl[2]
  local a = accepted[fk] or 0
  redis.call('HINCRBY', P .. 'c', fk .. 'seen', seen)
  if a > 0 then redis.call('HINCRBY', P .. 'c', fk .. 'accepted', a) end
  if seen > a then redis.call('HINCRBY', P .. 'c', fk .. 'duplicate', seen - a) end
  redis.call('HSET', P .. 'f', fk, A.now)
end
"""

REJECT = """
local out = true
for _, it in ipairs(A.items) do
  redis.call('HINCRBY', P .. 'c', it[1] .. 'rejected', 1)
  redis.call('HINCRBY', P .. 'c', it[1] .. 'rejected:' .. it[2], 1)
  redis.call('LPUSH', P .. 'j', it[3])
end
redis.call('LTRIM', P .. 'j', 0, A.keep - 1)
"""

START = """
local out = {}
for i, it in ipairs(A.items) do
  local fk, id = it[1], it[2]
  local k = fk .. id
  local rk = P .. 'r:' .. k
  local st = redis.call('HGET', rk, 'st')
  if st == 'pending' or st == 'failed' then
    local at = redis.call('HINCRBY', rk, 'at', 1)
    redis.call('HSET', rk, 'st', 'running', 'wk', it[3], 'up', A.now)
    set_or_drop(rk, 'ba', A.batch)
    redis.call('HDEL', rk, 'nx')
    move(k, fk, id, redis.call('HGET', rk, 'cr'), st, 'running')
    out[i] = {at, tonumber(redis.call('HGET', rk, 'se'))}
  else
    out[i] = false
  end
end
"""

FINISH = """
local out = {}
for i, it in ipairs(A.items) do
  local k = it.fk .. it.id
  local rk = P .. 'r:' .. k
  if redis.call('HGET', rk, 'st') == 'running'
      and tonumber(redis.call('HGET', rk, 'at')) == it.attempt then
    redis.call('HSET', rk, 'st', it.state, 'up', A.now)
    set_or_drop(rk, 'er', it.er)
    set_or_drop(rk, 'tb', it.tb)
    set_or_drop(rk, 'nx', it.nx)
    if it.fr then redis.call('HSET', rk, 'fr', it.fr) end
    move(k, it.fk, it.id, redis.call('HGET', rk, 'cr'), 'running', it.state)
    out[i] = true
  else
    out[i] = false
  end
end
"""

REPLAY = """
local keys = {}
if A.all then
  keys = redis.call('ZRANGE', P .. 's:dead', 0, -1)
else
  for i, it in ipairs(A.items) do keys[i] = it[1] .. it[2] end
end
local out = {}
for _, k in ipairs(keys) do
  local rk = P .. 'r:' .. k
  if redis.call('HGET', rk, 'st') == 'dead' then
    redis.call('HSET', rk, 'st', 'pending', 'at', 0, 'up', A.now)
    redis.call('HINCRBY', rk, 'se', 1)
    redis.call('HDEL', rk, 'er', 'tb', 'nx')
    local parts = redis.call('HMGET', rk, 'fk', 'id', 'cr', 'ev')
    move(k, parts[1], parts[2], parts[3], 'dead', 'pending')
    out[#out + 1] = parts[4]
  end
end
"""

OPEN_RUNS = """
local out = {}
for _, st in ipairs(A.states) do
  for _, k in ipairs(redis.call('ZRANGE', P .. 's:' .. st, 0, -1)) do
    out[#out + 1] = redis.call('HGETALL', P .. 'r:' .. k)
  end
end
return out
"""

PENDING = """
local out = {}
if A.limit <= 0 then return out end
for _, id in ipairs(redis.call('ZRANGE', P .. 'q:' .. A.fk, 0, A.limit - 1)) do
  out[#out + 1] = redis.call('HGET', P .. 'r:' .. A.fk .. id, 'ev')
end
return out
"""

# Newest first, in chunks; past ``limit`` matches, only runs tied with the last one are added
# (the caller orders ties by event id and cuts at ``limit``).
RUNS = """
local out = {}
if A.limit <= 0 then return out end
local index, by_id = P .. 'a', false
if A.fk then index, by_id = P .. 'l:' .. A.fk, true
elseif A.st then index = P .. 's:' .. A.st end
local start, last = 0, nil
while true do
  local chunk = redis.call('ZREVRANGE', index, start, start + 499, 'WITHSCORES')
  if #chunk == 0 then return out end
  for i = 1, #chunk, 2 do
    local score = tonumber(chunk[i + 1])
    if #out >= A.limit and score < last then return out end
    local k = chunk[i]
    if by_id then k = A.fk .. k end
    local rk = P .. 'r:' .. k
    local row = redis.call('HMGET', rk, 'st', 't', 'f')
    if (not A.st or row[1] == A.st) and (not A.t or row[2] == A.t)
        and (not A.f or row[3] == A.f) then
      out[#out + 1] = redis.call('HGETALL', rk)
      last = score
    end
  end
  start = start + 500
end
"""

COUNTS = """
return {redis.call('HGETALL', P .. 'c'), redis.call('HGETALL', P .. 'n'),
        redis.call('HGETALL', P .. 'f')}
"""

SET_PAUSED = """
redis.call('HSETNX', P .. 'f', A.fk, '')
if A.paused then redis.call('SADD', P .. 'p', A.fk) else redis.call('SREM', P .. 'p', A.fk) end
return true
"""

WRITES = {"claim": CLAIM, "reject": REJECT, "start": START, "finish": FINISH, "replay": REPLAY}
READS = {
    "open_runs": OPEN_RUNS,
    "pending": PENDING,
    "runs": RUNS,
    "counts": COUNTS,
    "set_paused": SET_PAUSED,
}


def scripts() -> dict[str, str]:
    """Every script's full Lua source by name."""
    out = {name: PRELUDE + ONCE_BEGIN + body + ONCE_END for name, body in WRITES.items()}
    out.update({name: PRELUDE + body for name, body in READS.items()})
    return out
