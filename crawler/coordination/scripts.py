"""The coordinated mode's atomic steps, as Lua scripts Redis runs whole: one script, one step.

No script decides a rule of the job: ``crawler.state.rules`` does, and ``APPLY`` persists what it
decided. The others are the coordination's own primitives: registering a worker, leasing and
renewing products, sealing a dead worker's shard, the shared rate gate. Time is Redis's
(``TIME``), never a worker's clock: machines drift. Every script that a worker may send again
after a lost reply is idempotent: it carries the worker's sequence number and answers a repeat
with what it answered the first time. Keys (prefix ``crawler:<job>:``):

    meta           hash   output settings, id, origin:<host>, targets digest, count and list,
                          refresh (the one under way), refresh_queued
    init           string the lock held while one worker writes the targets into Redis
    p:<product>    hash   e: lease epoch (fencing token), o: holder#incarnation, v: targets'
                          version, r:<REGION>: a target (``writes.doc_of``)
    todo           list   products to walk, not leased
    leases         zset   product -> lease deadline (ms): an expired one may be taken over
    seen:<product> set    review ids of the product committed to some shard
    ledger         hash   leased, credits, forfeited: the job's credit ledger
    totals         hash   <status>|<figure> -> sum over targets: status without reading them all
    attention      set    <product>:<REGION> of targets failed, at their credit cap, or short
    retry          set    products with such targets: queued again when a worker starts
    shards         hash   file -> {worker, seq, records, bytes, sha256 (null while open)}
    shardorder     zset   file -> the order shards were opened in
    workers        zset   worker -> last heartbeat (ms)
    w:<worker>     hash   inc (incarnation), commit_seq, lease_seq, outstanding (credits leased,
                          not used), next_shard, open_shard, info; so:<series>, sn:<series>
    runs           list   one summary per worker run, newest first
    refreshes      hash   refresh -> {started_at, mode}
    refresh:<N>    hash   refresh N's figures (``rules.REFRESH_FIGURES``)
    p:~<series>    hash   a source endpoint's series, leased as a product: e, o, v, and
                          t:<source>|<fields> (a source target), f:<source>|<fields> (found)
    series         set    the job's source endpoints
    iseen:<series> set    item ids of the series committed to some shard
    found          set    <product>:<REGION> of every target a source named
    sshards        hash   series file -> {series, worker, seq, records, bytes, sha256}
    sshardorder    zset   series file -> the order opened

The rate gate's state is per API key, shared by every job: ``crawler:rate:<key fingerprint>``
(hash), ``crawler:rate:<key fingerprint>:sent`` (list: the last slots handed out) and
``crawler:rate:<key fingerprint>:said`` (hash: the rate each job said, and when).
"""

from __future__ import annotations

from crawler.pacing import slowdown

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# every script of a job marks when it ran; a gap longer than half a lease means no worker could
# reach Redis (an outage, a stall, a partition of all of them): every heartbeat and lease looks
# old then for that reason alone, so nothing is taken over for a lease after it
_QUIET = """
local function quiet_until(prefix, now, lease)
  local key = prefix .. 'clock'
  local last = tonumber(redis.call('HGET', key, 'seen') or '0')
  if last > 0 and now - last > lease / 2 then
    redis.call('HSET', key, 'quiet', string.format('%.0f', now + lease))
  end
  redis.call('HSET', key, 'seen', string.format('%.0f', now))
  return tonumber(redis.call('HGET', key, 'quiet') or '0')
end
"""

# how long Redis has been up (ms): just after a restart every heartbeat and lease looks old,
# only because Redis was gone for every worker alike: nothing is taken over until a lease later
_UPTIME = """
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
uptime = uptime * 1000
"""

# a worker starts: a new incarnation (its earlier one, if alive, is retired by this), heartbeat;
# the products its earlier incarnation held are its to take back at once (lease deadline 0)
REGISTER = (
    _NOW
    + """
-- KEYS: w:<worker>, workers, leases;  ARGV: worker, info (JSON), prefix
local inc = redis.call('HINCRBY', KEYS[1], 'inc', 1)
redis.call('HSETNX', KEYS[1], 'next_shard', 1)  -- shard numbers start at 1, as one process's
redis.call('HSET', KEYS[1], 'info', ARGV[2], 'started', now)
redis.call('HDEL', KEYS[1], 'ended')  -- alive again: retired only by its own end or death
redis.call('ZADD', KEYS[2], now, ARGV[1])
local mine = ARGV[1] .. '#'
for _, pid in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local owner = redis.call('HGET', ARGV[3] .. 'p:' .. pid, 'o') or ''
  if string.sub(owner, 1, #mine) == mine then redis.call('ZADD', KEYS[3], 0, pid) end
end
return {inc, redis.call('HGET', KEYS[1], 'commit_seq') or '0',
        redis.call('HGET', KEYS[1], 'lease_seq') or '0',
        redis.call('HGET', KEYS[1], 'next_shard'),
        redis.call('HGET', KEYS[1], 'open_shard') or ''}
"""
)

# the next product to walk: one whose lease expired first (its holder died), else the queue's;
# answered with the refresh under way as it is taken (a refresh another worker started meanwhile)
CLAIM = (
    _NOW
    + _UPTIME
    + _QUIET
    + """
-- KEYS: todo, leases, w:<worker>, retry
-- ARGV: prefix, worker, request id, lease ms, incarnation, take expired leases (1/0)
local me = ARGV[2] .. '#' .. ARGV[5]
local lease = tonumber(ARGV[4])
if tonumber(redis.call('HGET', KEYS[3], 'inc')) ~= tonumber(ARGV[5]) then return {'retired'} end
local quiet = quiet_until(ARGV[1], now, lease)
if redis.call('HGET', KEYS[3], 'claim_req') == ARGV[3] then
  -- a repeat after a lost answer: the product, if this worker still holds it under that claim
  local pid = redis.call('HGET', KEYS[3], 'claim_pid')
  if pid == '' then return {} end
  local key = ARGV[1] .. 'p:' .. pid
  local epoch = redis.call('HGET', KEYS[3], 'claim_epoch')
  if redis.call('HGET', key, 'e') ~= epoch or redis.call('HGET', key, 'o') ~= me then return {} end
  return {pid, epoch, redis.call('HGETALL', key),
          redis.call('HGET', ARGV[1] .. 'meta', 'refresh') or '0'}
end
-- given back by a worker's earlier incarnation first, then expired (not just after an outage)
local pid = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', 0, 'LIMIT', 0, 1)[1]
local free = ARGV[6] == '1' and uptime > lease and now >= quiet
if not pid and free then
  -- this very incarnation's lease, run out while it was slow, is still its own: renewed, never
  -- taken again (its pages in flight would meet a seen-set loaded anew)
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 16)) do
    if redis.call('HGET', ARGV[1] .. 'p:' .. old, 'o') == me then
      redis.call('ZADD', KEYS[2], now + lease, old)
    else
      pid = old
      break
    end
  end
end
while not pid do  -- the queue may name a product another worker holds now: not taken from it
  pid = redis.call('LPOP', KEYS[1])
  if not pid then break end
  local deadline = tonumber(redis.call('ZSCORE', KEYS[2], pid) or '-1')
  -- held: a lease not run out, or one that only looks run out (the quiet after an outage)
  if deadline > now or (deadline > 0 and not free) then
    redis.call('SADD', KEYS[4], pid)  -- whatever it was queued for is looked at next start
    pid = nil
  end
end
if not pid then
  -- nothing free: while another worker holds a product, it may yet die and leave it to us
  local held = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    if redis.call('HGET', ARGV[1] .. 'p:' .. held[i], 'o') ~= me then
      return {'wait', tostring(math.max(1, tonumber(held[i + 1]) - now))}
    end
  end
  redis.call('HSET', KEYS[3], 'claim_req', ARGV[3], 'claim_pid', '')
  return {}
end
local key = ARGV[1] .. 'p:' .. pid
local epoch = tostring(redis.call('HINCRBY', key, 'e', 1))
redis.call('HSET', key, 'o', me)
redis.call('ZADD', KEYS[2], now + lease, pid)
redis.call('HSET', KEYS[3], 'claim_req', ARGV[3], 'claim_pid', pid, 'claim_epoch', epoch)
return {pid, epoch, redis.call('HGETALL', key),
        redis.call('HGET', ARGV[1] .. 'meta', 'refresh') or '0'}
"""
)

# heartbeat and lease renewal: the products whose epoch moved on are lost to this worker
RENEW = (
    _NOW
    + _QUIET
    + """
-- KEYS: leases, workers, w:<worker>;  ARGV: prefix, worker, lease ms, inc, info, pid, epoch, ...
if tonumber(redis.call('HGET', KEYS[3], 'inc')) ~= tonumber(ARGV[4]) then return {'retired'} end
quiet_until(ARGV[1], now, tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], now, ARGV[2])
-- workers gone a day leave the heartbeat list (their record stays: it numbers their shards)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400000)
redis.call('HSET', KEYS[3], 'beat', now, 'live', ARGV[5])
local lost = {'ok'}
for i = 6, #ARGV, 2 do
  local key = ARGV[1] .. 'p:' .. ARGV[i]
  if redis.call('HGET', key, 'e') == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
)

# the one script that writes a job's state: the checks and writes a rule of ``crawler.state.rules``
# decided, applied whole or not at all. Refused when this incarnation was retired, or when a
# checked field no longer holds what the rule read (another worker moved it: read again and
# decide again); a repeat of an applied payload (same sequence number) answers ok, changing nothing.
APPLY = (
    _NOW
    + """
-- KEYS: w:<worker>
-- ARGV: payload (JSON): inc, chan (the worker's sequence field, '' for none), seq, rid (a request
--       id: a repeat is answered ok, changing nothing; kept an hour), checks [[key, field, value
--       ('' for absent)], ...], ops [[command, key, arg, ...], ...]
--       ('$now' in an op stands for Redis's time in ms; an op ['UNLESS', key, field, value, ...]
--       runs the command after the value only when the field no longer holds it)
local p = cjson.decode(ARGV[1])
local w = KEYS[1]
if p.inc ~= cjson.null and tonumber(redis.call('HGET', w, 'inc')) ~= p.inc then
  return {'retired'}
end
if p.chan ~= '' and p.seq <= tonumber(redis.call('HGET', w, p.chan) or '0') then return {'ok'} end
local applied, rid = w .. ':applied', p.rid or ''
if rid ~= '' and redis.call('ZSCORE', applied, rid) then return {'ok'} end
local stale = {'stale'}
for _, c in ipairs(p.checks) do
  if (redis.call('HGET', c[1], c[2]) or '') ~= c[3] then table.insert(stale, c[1]) end
end
if #stale > 1 then return stale end
local text = string.format('%.0f', now)
for _, op in ipairs(p.ops) do
  if op[1] == 'UNLESS' then
    if (redis.call('HGET', op[2], op[3]) or '') == op[4] then op = nil
    else op = {unpack(op, 5)} end
  end
  if op then
    for i = 2, #op do if op[i] == '$now' then op[i] = text end end
    redis.call(unpack(op))
  end
end
if p.chan ~= '' then redis.call('HSET', w, p.chan, p.seq) end
if rid ~= '' then
  redis.call('ZADD', applied, now, rid)
  redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - 3600000)
end
return {'ok'}
"""
)

# a lock one worker holds while it writes the targets: kept (ms > 0) or let go (ms = 0) only by
# its holder, whose token it is: a worker that wakes after its lock ran out takes no other's
LOCK = """
-- KEYS: the lock;  ARGV: token, ms
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

# the workers silent for longer than two leases that neither ended nor were retired yet
SILENT = (
    _NOW
    + """
-- KEYS: workers;  ARGV: stale ms, prefix
local silent = {}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))) do
  if redis.call('HGET', ARGV[2] .. 'w:' .. w, 'ended') ~= '1' then table.insert(silent, w) end
end
return silent
"""
)

# a dead worker retired by a worker that sees its files: its incarnation moved on (a late wake-up
# commits nothing), its open shard (if any) sealed at the copy of its committed length, its lease
# forfeited. The caller then removes its files no commit recorded (a batch's new shard)
ADOPT = (
    _NOW
    + _UPTIME
    + """
-- KEYS: workers, w:<dead>, shards
-- ARGV: dead worker, its incarnation, stale ms, open file ('' for none), sealed (JSON), the
--       record copied (JSON), prefix
-- sent again after a lost answer: it retired that incarnation already
if redis.call('HGET', KEYS[2], 'ended') == '1'
   and redis.call('HGET', KEYS[2], 'inc') == tostring(tonumber(ARGV[2]) + 1) then return 'ok' end
local beat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
if now - beat < tonumber(ARGV[3]) or uptime < tonumber(ARGV[3]) then return 'alive' end
if now < tonumber(redis.call('HGET', ARGV[7] .. 'clock', 'quiet') or '0') then return 'alive' end
if redis.call('HGET', KEYS[2], 'inc') ~= ARGV[2] then return 'changed' end
if (redis.call('HGET', KEYS[2], 'open_shard') or '') ~= ARGV[4] then return 'changed' end
if ARGV[4] ~= '' then
  -- a commit since the copy was taken (it was only paused) makes the copy short: not sealed
  if redis.call('HGET', KEYS[3], ARGV[4]) ~= ARGV[6] then return 'changed' end
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  redis.call('HINCRBY', ARGV[7] .. 'meta', 'shards_version', 1)
end
redis.call('HINCRBY', KEYS[2], 'inc', 1)
redis.call('HSET', KEYS[2], 'open_shard', '', 'ended', 1)
-- the retired incarnation's credit lease is forfeited here, in the same step (rules.crashed)
local out = tonumber(redis.call('HGET', KEYS[2], 'outstanding') or '0')
if out > 0 then
  redis.call('HINCRBY', ARGV[7] .. 'ledger', 'forfeited', out)
  redis.call('HSET', KEYS[2], 'outstanding', 0)
end
return 'ok'
"""
)

# GCRA over every worker of every job on one API key: up to n request slots, spaced 1/rate
# apart on Redis's clock; answers the slots' delays (µs from now) or, while a 429 pause holds or
# no slot is free yet, {-1, µs to wait}. Besides, a slot comes no sooner than ``span`` after the
# one ``count`` before it (the sliding window of ``limits.window_of``: a server counting requests
# per second sees no more than it allows). After 429s the rate follows ``slowdown.py`` (fields
# factor, ceiling, changed, reached), as the single-process gate does.
_RECOVER = """
local factor = tonumber(redis.call('HGET', key, 'factor') or '1')
if factor < 1 then
  local margin = tonumber(redis.call('HGET', key, 'margin') or '@CLIMB@')
  local safe = margin * tonumber(redis.call('HGET', key, 'ceiling') or '1')
  if factor < safe then
    local changed = tonumber(redis.call('HGET', key, 'changed') or '0')
    local quiet = (now - math.max(changed, pause)) / 1000000
    if quiet >= 1 then
      factor = math.min(safe, factor + @RECOVERY@ * quiet)
      redis.call('HSET', key, 'factor', factor, 'changed', string.format('%.0f', now))
      if factor >= safe then redis.call('HSET', key, 'reached', string.format('%.0f', now)) end
    end
  else
    local reached = tonumber(redis.call('HGET', key, 'reached') or '0')
    if reached == 0 then  -- a hash an older crawler wrote: the hold starts now
      reached = now
      redis.call('HSET', key, 'reached', string.format('%.0f', now))
    end
    local held = (now - math.max(reached, pause)) / 1000000
    local probed = math.min(1, safe + @PROBE@ * (held - @HOLD@))
    if probed >= math.min(1, factor + @PROBE@) then
      factor = probed
      redis.call('HSET', key, 'factor', factor)
    end
  end
end
"""
RATE = (
    """
-- KEYS: rate, sent (slot times handed out, oldest first)
-- ARGV: rate (requests/s), slack (requests), n, window margin
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local key = KEYS[1]
local pause = tonumber(redis.call('HGET', key, 'pause') or '0')
if now < pause then return {-1, pause - now} end
"""
    + _RECOVER
    + """
local rate = tonumber(ARGV[1]) * factor
local interval = 1000000 / rate
local tolerance = tonumber(ARGV[2]) * interval
-- the window is the configured rate's (limits.window_of): a slower pace after a 429 is the GCRA's
local configured = tonumber(ARGV[1])
local count = math.max(1, math.floor(configured))
local span = math.max(1, count / configured) * (1 + tonumber(ARGV[4])) * 1000000
local keep = count
local tat = math.max(tonumber(redis.call('HGET', key, 'tat') or '0'), now)
local n = tonumber(ARGV[3])
local len = redis.call('LLEN', KEYS[2])
local base = len - count  -- index of the slot `count` before the first new one
local first = math.max(0, base)
local old = {}
if base + n > 0 and first < len then
  old = redis.call('LRANGE', KEYS[2], first, math.min(len, base + n) - 1)
end
local slots, delays, last = {}, {}, now
for i = 1, n do
  local at = math.max(last, tat - tolerance)
  local before = base + i - 1
  if before >= len then
    at = math.max(at, slots[before - len + 1] + span)
  elseif before >= 0 then
    at = math.max(at, tonumber(old[before - first + 1]) + span)
  end
  if i == 1 and at > now then return {-1, math.max(1, math.ceil(at - now))} end
  if at - now > tolerance then break end  -- slots further out are left to whoever asks then
  slots[i], delays[i], last = at, math.floor(at - now), at
  tat = math.max(tat, at) + interval
end
-- integers as text: Lua would print 16 digits as 1.79...e+15 and lose the microseconds
local texts = {}
for i, at in ipairs(slots) do texts[i] = string.format('%.0f', at) end
redis.call('RPUSH', KEYS[2], unpack(texts))
redis.call('LTRIM', KEYS[2], -keep, -1)
redis.call('HSET', key, 'tat', string.format('%.0f', tat))
redis.call('PEXPIRE', key, 3600000)
redis.call('PEXPIRE', KEYS[2], 3600000)
return delays
"""
)

# the rate each job says for the key (job -> "rate when", µs), kept an hour: answers the other
# jobs' (job, rate, ...) said within the hour. Jobs that share a key and say different rates pace
# the key's slots at each's own. Sent again after a lost answer, it answers the same.
RATE_SAID = (
    _NOW
    + """
-- KEYS: said;  ARGV: rate (requests/s), job
redis.call('HSET', KEYS[1], ARGV[2], ARGV[1] .. ' ' .. string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], 3600000)
local others = {}
local said = redis.call('HGETALL', KEYS[1])
for i = 1, #said, 2 do
  local rate, at = string.match(said[i + 1], '(%S+) (%S+)')
  if now - tonumber(at) > 3600000000 then
    redis.call('HDEL', KEYS[1], said[i])
  elseif said[i] ~= ARGV[2] then
    table.insert(others, said[i])
    table.insert(others, rate)
  end
end
return others
"""
)

# a 429: pause every worker on the key; a new episode slows down (``slowdown.Slowdown.limited``)
RATE_LIMITED = """
-- KEYS: rate;  ARGV: pause (µs), µs since the request was sent
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local key = KEYS[1]
local pause = tonumber(redis.call('HGET', key, 'pause') or '0')
local began = tonumber(redis.call('HGET', key, 'began') or '0')
-- a request sent before the last episode began says nothing new of the rate now
local episode = now >= pause and now - tonumber(ARGV[2]) >= began
redis.call('HSET', key, 'pause', string.format('%.0f', math.max(pause, now + tonumber(ARGV[1]))))
if episode then
  local factor = tonumber(redis.call('HGET', key, 'factor') or '1')
  local ceiling = tonumber(redis.call('HGET', key, 'ceiling') or '1')
  local margin = tonumber(redis.call('HGET', key, 'margin') or '@CLIMB@')
  local reached = redis.call('HGET', key, 'reached')  -- false while climbing back
  local text = string.format('%.0f', now)
  if factor > margin * ceiling * (1 + 1e-9) and reached and tonumber(reached) <= now then
    redis.call('HSET', key, 'factor', math.max(@FLOOR@, @PROBED@ * factor), 'margin', @PROBED@,
               'reached', text)
  else
    local halved = math.max(@FLOOR@, factor * @HALVE@)
    redis.call('HSET', key, 'factor', halved, 'margin', @CLIMB@)
    if halved >= @CLIMB@ * factor then  -- at the floor: held, then probed (slowdown.py)
      redis.call('HSET', key, 'reached', text)
    else
      redis.call('HDEL', key, 'reached')
    end
  end
  redis.call('HSET', key, 'ceiling', factor, 'changed', text, 'began', text)
  redis.call('HINCRBY', key, 'episodes', 1)
end
redis.call('PEXPIRE', key, 3600000)
-- the ceiling as text: Redis would answer a Lua number as an integer, 0
return {episode and 1 or 0, redis.call('HGET', key, 'ceiling') or '1'}
"""


def _with_slowdown(script: str) -> str:
    """The script with ``slowdown.py``'s figures written in: one source for both gates."""
    figures = {
        "CLIMB": slowdown.SAFE_AFTER_CLIMB,
        "PROBED": slowdown.SAFE_AFTER_PROBE,
        "RECOVERY": slowdown.RECOVERY_PER_SECOND,
        "PROBE": slowdown.PROBE_PER_SECOND,
        "HOLD": slowdown.HOLD_SECONDS,
        "FLOOR": slowdown.FLOOR,
        "HALVE": slowdown.HALVE,
    }
    for name, figure in figures.items():
        script = script.replace(f"@{name}@", repr(float(figure)))
    if "@" in script:  # a figure named in a script and not above
        raise RuntimeError("a script names a figure slowdown.py does not give")
    return script


RATE = _with_slowdown(RATE)
RATE_LIMITED = _with_slowdown(RATE_LIMITED)
