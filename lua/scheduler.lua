-- scheduler.lua: weighted-fair backlogs under the token buckets. Runs with buckets.lua (one
-- Functions library, or prefixed to it as an EVALSHA script).
--
-- A lane is one queue. In a lane, each (tenant, priority) class has a FIFO backlog. Classes
-- are served by two-level stride scheduling: the tenant with the lowest pass goes first, and
-- inside it the priority with the lowest pass; serving `cost` advances the tenant's pass by
-- cost / tenant_weight and the priority's by cost / priority_weight. A class that becomes
-- backlogged joins at max(its own last pass, the current virtual time), so idle time banks
-- no credit and leaving and rejoining gains nothing; a fair clock that runs at the pace of
-- service bounds how far ahead a joining tenant goes (lane_clock). A tenant denied by its
-- own buckets is parked until its tokens return instead of being scanned on every call. A lane that empties is forgotten
-- (forget_lane); "purge" drops what waits in one.
--
-- Keys: every name comes from KeySpace (queue_ratelimit/_keys.py), whole (KEYS) or as the
-- prefix of a kind (ARGV 3-10) that the script appends user parts to, joined by ':'. With
-- S = <prefix>:{ns}:s2 (every key shares the namespace's hash tag):
--   S:active:<lane>          zset tenant -> pass (backlogged, not parked)
--   S:parked:<lane>          zset tenant -> ms when its own buckets allow again
--   S:tp:<lane>:<tenant>     zset priority -> pass (the tenant's backlogged priorities)
--   S:bl:<lane>:<t>:<p>      list of item ids (the class backlog, oldest first)
--   S:n:<lane>               hash tenant -> backlog size, ':total' -> lane backlog,
--                            ':vt' -> lane virtual time (pass of the last tenant served),
--                            ':gv' -> fair clock, ':st' -> last stride, ':ep' -> epoch
--                            (all: lane_clock), ':jb' -> budget of free first services
--                            (dispatch), ':cv' -> config version the parked tenants were
--                            judged under; expires after the lane empties (forget_lane)
--   S:age:<lane>             zset item id -> ms it was first queued (oldest waiting job)
--   S:inflight               zset item id -> lease deadline (ms); one that ran out is taken
--                            back (reap), unless it ran out in a silence (buckets.lua,
--                            "Silences": shared hash field s:seen)
--   S:lease                  hash item id -> lease token of its current lease: a worker
--                            whose lease ran out cannot close or renew the next holder's;
--                            "<token> <cap scope> ..." when the item holds concurrency
--                            slots (holder "<token>/<id>" in each <prefix>:{ns}:c:<scope>,
--                            buckets.lua), which ack, nack and reap release and extend renews
--   (shared hash field n:lease: the last lease token handed out)
--   S:meta                   hash item id -> "<lane> <tenant> <priority> <cost> <queued ms>
--                            <p or ->" (p: a payload is stored)
--   S:payload                hash item id -> opaque payload
--   S:lanes                  set of the lanes with work (metrics find them without SCAN)
--   S:done:<id>              "this item already ran" (ack with remember), checked by submit;
--                            its value is the lease token it was closed under ("1": none)
--   S:receipt:<owner>        "<nonce> <id>..." of a caller's last dispatch
--   S:wake:<scope>           set "<lane> <tenant>" parked by the concurrency cap <scope>
--   S:tr:<lane>:<tenant>     zset item id -> ms its entry lapses: the tenant's jobs in
--                            transit (enqueued with a hint, not yet seen by a gate: in the
--                            broker, on RQ's list); see hint.lua
--   tenant hash (buckets.lua) fields sp:<lane> (tenant pass, "<pass>@<lane epoch>"; a lane
--   from before epochs: "<pass>"), pp:<lane>:<p> (priority pass),
--   pv:<lane> (tenant-local virtual time); they expire with the tenant when it is idle.
--
-- Lost items: a Redis that evicts keys (maxmemory-policy allkeys-* or volatile-*) may drop
-- any of these. No script fails on a missing key: an item found without its record (or
-- without the payload its record says it has) is dropped from where it was found and
-- counted in the shared hash's n:lost, and so is the backlog count of a tenant whose
-- backlog vanished. Items whose whole backlog list vanished leave no trace to count.
--
-- KEYS: config, shared, inflight, lease, meta, payload, lanes; then per mode (see each).
-- ARGV[1] = mode, ARGV[2] = counter retention (ms), ARGV[3..11] = the prefixes (active,
-- parked, counts, age, classes, backlog, waiters, tenant, transit:
-- KeySpace.scheduler_prefixes); the mode's own arguments follow (see each branch).

local config_key, shared_key, inflight_key, lease_key, meta_key, payload_key, lanes_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local mode, keep_ms = ARGV[1], tonumber(ARGV[2])
local P_ACTIVE, P_PARKED, P_COUNTS, P_AGE, P_CLASSES, P_BACKLOG, P_WAKE, P_TENANT, P_TRANSIT =
  ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
-- What buckets.lua's release_slots needs to wake tenants parked by a released cap.
local function waking() return {wake = P_WAKE, parked = P_PARKED} end
local A = 11  -- the mode's arguments are ARGV[A + 1], ARGV[A + 2], ...
local DEFAULT_PRIORITY_WEIGHTS = {high = 3, normal = 2, low = 1}
local REAP_BATCH, UNPARK_BATCH = 16, 32
local RECEIPT_MS = 86400000  -- a dispatch receipt outlives any outage a caller recovers from

local function tenant_key(tenant) return P_TENANT .. tenant end
local function transit_key(lane, tenant) return P_TRANSIT .. lane .. ':' .. tenant end
local function classes_key(lane, tenant) return P_CLASSES .. lane .. ':' .. tenant end
local function backlog_key(lane, tenant, priority)
  return P_BACKLOG .. lane .. ':' .. tenant .. ':' .. priority
end
local prefix = ns_prefix(config_key)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- A priority the backlog keeps as it is: one weighted by default or with a weight, a limit
-- or a pause of its own (buckets.lua, priority_as: the rule decisions follow too, so that a
-- scope holds its parked work back as it held it at the gate). A priority without a weight
-- weighs 1 (dispatch). Any other name is queued as 'normal'.
local function known_priority(priority)
  return priority_as(config_key, priority) == priority
end

local function record(lane, tenant, priority, cost, queued, with_payload)
  return lane .. ' ' .. tenant .. ' ' .. priority .. ' ' .. cost .. ' ' .. math.floor(queued) ..
    (with_payload and ' p' or ' -')
end

-- An item's record, read: lane, tenant, priority, cost, queued ms, has a payload; nothing
-- for a record that is missing (evicted) or unreadable.
local function split_meta(meta)
  if not meta then return nil end
  local lane, tenant, priority, cost, queued, stored =
    string.match(meta, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S)$')
  cost = tonumber(cost)
  if not cost then return nil end
  return lane, tenant, priority, cost, tonumber(queued) or 0, stored == 'p'
end

local function count_lost(n)
  if n > 0 then redis.call('HINCRBY', shared_key, 'n:lost', n) end
end

-- One item of `tenant` left the lane's backlog: its counts go down (never below zero).
local function taken(counts, tenant)
  if redis.call('HINCRBY', counts, tenant, -1) <= 0 then redis.call('HDEL', counts, tenant) end
  if redis.call('HINCRBY', counts, ':total', -1) < 0 then redis.call('HSET', counts, ':total', 0) end
end

-- A tenant has no backlogged class left in the lane: whatever its count still says was in
-- backlogs that are gone (evicted). Counted as lost, and the count made true again.
local function settle_tenant(counts, tenant)
  local left = tonumber(redis.call('HGET', counts, tenant))
  if not left then return end
  redis.call('HDEL', counts, tenant)
  if left > 0 then
    count_lost(left)
    if redis.call('HINCRBY', counts, ':total', -left) < 0 then redis.call('HSET', counts, ':total', 0) end
  end
end

-- The fields of a lane's counts hash that are not tenants (metrics.LANE_COUNT_FIELDS).
local LANE_FIELDS = {':total', ':vt', ':cv', ':ep', ':gv', ':st', ':jb'}
-- First services of joining tenants a lane does not count on its fair clock (see dispatch):
-- at most JUMP_BUDGET in a row, JUMP_REFILL more per service.
local JUMP_BUDGET, JUMP_REFILL = 8, 0.1

-- A lane with nothing scheduled, parked or counted is forgotten: it leaves the lanes set at
-- once, and its counts hash (its clocks and epoch) expires after the counter retention, as
-- an idle tenant's hash does, so a queue used once leaves nothing behind. Work that comes
-- back sooner finds the lane's clocks as they were (enqueue keeps the hash again): a lane
-- that drains between bursts keeps its fair order. After that, its next item starts a new
-- epoch (lane_clock). Items of the lane in flight are not its backlog: a nack or reap
-- brings the lane back (enqueue).
local function forget_lane(lane)
  if redis.call('EXISTS', P_ACTIVE .. lane) == 1 or redis.call('EXISTS', P_PARKED .. lane) == 1 then
    return
  end
  local counts = P_COUNTS .. lane
  if redis.call('PTTL', counts) ~= -1 then  -- forgotten already, or never used
    redis.call('SREM', lanes_key, lane)
    return
  end
  local v = redis.call('HMGET', counts, unpack(LANE_FIELDS))
  local known = 0
  for i = 1, #LANE_FIELDS do
    if v[i] then known = known + 1 end
  end
  if (v[1] and tonumber(v[1]) ~= 0) or redis.call('HLEN', counts) > known then return end
  redis.call('DEL', P_AGE .. lane)
  redis.call('PEXPIRE', counts, keep_ms)
  redis.call('SREM', lanes_key, lane)
end

-- A pass or virtual time as stored: one that is not finite (left by that old arithmetic)
-- counts as 0, so the lane serves its tenants again instead of failing every call.
local function finite(x)
  if x and x == x and x > -math.huge and x < math.huge then return x end
  return 0
end

-- Where a tenant that becomes backlogged in `lane` joins: a hair below the lane's virtual
-- time ':vt' (the pass of the tenant served last), so a quiet tenant goes before the
-- tenants tied there instead of waiting a round for those whose names sort first; but no
-- lower than one stride (':st', the last service's cost / weight) below the fair clock
-- ':gv', which runs at the pace of fair service (see dispatch). Tenants served at once
-- after joining do not move ':vt'; they move ':gv', so a stream of new tenants cannot keep
-- a waiting one out: it is served once ':gv' has run a stride past its pass.
--
-- And the lane's epoch: a lane whose counts hash is gone (it emptied and was forgotten:
-- forget_lane) starts a new one, numbered from the shared hash's s:ep; a tenant's own pass
-- (sp:<lane>, "<pass>@<epoch>") counts only in the epoch it was written in, so a tenant
-- that was busy in an earlier life of the lane is not held back by that pass now. A lane
-- from before epochs has none: its untagged passes count. (The first join of an epoch
-- writes it; the clocks start at 0.)
local function lane_clock(lane)
  local counts = P_COUNTS .. lane
  local v = redis.call('HMGET', counts, ':vt', ':ep', ':gv', ':st')
  local ep = v[2]
  if not v[1] and not ep then
    ep = tostring(redis.call('HINCRBY', shared_key, 's:ep', 1))
    redis.call('HSET', counts, ':ep', ep)
  end
  local vt = finite(tonumber(v[1]))
  local floor = finite(tonumber(v[3])) - finite(tonumber(v[4]))
  return math.max(vt - 1e-9 * math.max(1, math.abs(vt)), floor), ep or ''
end

-- A tenant's own pass in a lane as stored: its value if it was written in the lane's
-- current epoch `ep`, else 0 (an earlier epoch's pass means nothing now).
local function own_pass(stored, ep)
  if not stored then return 0 end
  local pass, tag = string.match(stored, '^([^@]*)@?(.*)$')
  if tag ~= ep then return 0 end
  return finite(tonumber(pass))
end

-- Make sure `tenant` is scheduled in `lane`: active at max(own pass, lane virtual time)
-- unless it is already active or parked.
local function join_tenant(lane, tenant)
  local active = P_ACTIVE .. lane
  if redis.call('ZSCORE', active, tenant) or redis.call('ZSCORE', P_PARKED .. lane, tenant) then
    return
  end
  local at, ep = lane_clock(lane)
  local own = own_pass(redis.call('HGET', tenant_key(tenant), 'sp:' .. lane), ep)
  redis.call('ZADD', active, math.max(own, at), tenant)
end

-- Make sure `priority` is scheduled inside the tenant, joining at max(own, tenant vt).
local function join_priority(lane, tenant, priority)
  local tp = classes_key(lane, tenant)
  if redis.call('ZSCORE', tp, priority) then return end
  local v = redis.call('HMGET', tenant_key(tenant), 'pp:' .. lane .. ':' .. priority, 'pv:' .. lane)
  redis.call('ZADD', tp, math.max(finite(tonumber(v[1])), finite(tonumber(v[2]))), priority)
end

-- Put an item back into its class backlog: at the head (its old position) or the tail.
-- False, and nothing queued, when its record is gone (evicted): the item is lost.
local function enqueue(id, at_head)
  local lane, tenant, priority, _, queued = split_meta(redis.call('HGET', meta_key, id))
  if not lane then return false end
  local push = at_head and 'LPUSH' or 'RPUSH'
  redis.call(push, backlog_key(lane, tenant, priority), id)
  redis.call('ZADD', P_AGE .. lane, queued, id)
  local counts = P_COUNTS .. lane
  redis.call('HINCRBY', counts, tenant, 1)
  if redis.call('HINCRBY', counts, ':total', 1) == 1 then
    -- The lane may have been forgotten (forget_lane): it is back, and its clocks stay.
    redis.call('PERSIST', counts)
    redis.call('SADD', lanes_key, lane)
  end
  join_priority(lane, tenant, priority)
  join_tenant(lane, tenant)
  return true
end

-- An item that cannot be served (its record or payload is gone) is forgotten and counted.
local function lose(id)
  redis.call('HDEL', meta_key, id)
  redis.call('HDEL', payload_key, id)
  count_lost(1)
end

-- Notes this call (buckets.lua, "Silences"); returns Redis time (ms) and the latest lease
-- deadline that may be taken back now (earlier than now while a silence's grace lasts).
-- `lease_ms`: the lease the call gives, if any.
local function lease_clock(lease_ms)
  local now = now_ms()
  return now, lease_horizon(shared_key, now, lease_ms)
end

-- Return items whose lease ran out (their worker died) to the head of their backlog: those
-- whose deadline is at most `horizon` (lease_clock). Newest first: each goes to the head,
-- so the oldest ends up in front, where it was.
local function reap(now, horizon)
  local expired = redis.call('ZREVRANGEBYSCORE', inflight_key, horizon, '-inf', 'LIMIT', 0, REAP_BATCH)
  for _, id in ipairs(expired) do
    redis.call('ZREM', inflight_key, id)
    if not enqueue(id, true) then lose(id) end
  end
  if #expired > 0 then
    -- Their concurrency slots ran out with their leases: give them back now.
    local held = redis.call('HMGET', lease_key, unpack(expired))
    for i, id in ipairs(expired) do
      local token, scopes = string.match(held[i] or '', '^(%S*) ?(.*)$')
      if scopes ~= '' then release_slots(prefix, token .. '/' .. id, words(scopes), now * 1000, waking()) end
    end
    redis.call('HDEL', lease_key, unpack(expired))
    redis.call('HINCRBY', shared_key, 'n:reaped', #expired)
  end
  return #expired
end

-- A weight divides costs into virtual time. One outside what the API accepts (written
-- before it checked, or by hand) is clamped into that range (MIN_WEIGHT, MAX_WEIGHT in
-- _scheduler.py), so every step is finite: a denormal once made it inf, and the next join
-- computed inf - inf.
local MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000000
local function weight(value, default)
  local w = tonumber(value)
  if not w or w ~= w or w <= 0 then return default end
  return math.min(math.max(w, MIN_WEIGHT), MAX_WEIGHT)
end

local function is_priority_scope(scope)
  return string.sub(scope, 1, 9) == 'priority:'
end

-- The backlogged priority of a tenant to serve next: its lowest pass among those not held
-- (`held`: priority -> ms its priority scope admits again, learnt by this dispatch call).
-- Nothing when the tenant has no backlogged priority; false, the ms the first held one
-- is due and that priority when every one is held.
local function pick_priority(tp, held)
  if next(held) == nil then
    local top = redis.call('ZRANGE', tp, 0, 0, 'WITHSCORES')
    if #top == 0 then return nil end
    return top[1], finite(tonumber(top[2]))
  end
  local all = redis.call('ZRANGE', tp, 0, -1, 'WITHSCORES')
  if #all == 0 then return nil end
  local soonest, first = false, false
  for i = 1, #all, 2 do
    local due = held[all[i]]
    if not due then return all[i], finite(tonumber(all[i + 1])) end
    if not soonest or due < soonest then soonest, first = due, all[i] end
  end
  return false, soonest, first
end

if mode == 'submit' then
  -- KEYS[8]: the item's done marker (KeySpace.done). ARGV: lane, tenant, priority, item id,
  -- cost, payload, backlog bound (optional; 0 or absent: none), at the head of its class
  -- ("1": a job handed back, e.g. after its downstream's 429; optional). Reply: 1 queued, 0
  -- duplicate id (queued, in flight, or remembered as done by ack), -2 unknown priority,
  -- -3 the lane's backlog already holds `bound` items.
  local lane, tenant, priority, id, cost, payload =
    ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], ARGV[A + 6]
  local bound = tonumber(ARGV[A + 7] or '0') or 0
  if not known_priority(priority) then
    return -2
  end
  if redis.call('EXISTS', KEYS[8]) == 1 then
    return 0
  end
  if bound > 0 and (tonumber(redis.call('HGET', P_COUNTS .. lane, ':total')) or 0) >= bound then
    return -3
  end
  if redis.call('HSETNX', meta_key, id, record(lane, tenant, priority, cost, now_ms(), payload ~= '')) == 0 then
    return 0
  end
  if payload ~= '' then redis.call('HSET', payload_key, id, payload) end
  redis.call('SADD', lanes_key, lane)
  -- Counted in the backlog from now on, no longer in transit (parked without a gate call:
  -- a saturated Celery worker parks what arrives as it is).
  redis.call('ZREM', transit_key(lane, tenant), id)
  enqueue(id, ARGV[A + 8] == '1')
  return 1
end

if mode == 'route' then
  -- Producer side: where a new job should wait. ARGV: lane, tenant, priority, item id, cost,
  -- plain list key, at front ("1"/"0"). When the lane has a fair backlog that could be
  -- served, or the tenant is held back, the job joins the backlog (reply 1) so it cannot
  -- overtake fairly queued work or sit behind a noisy tenant's jobs; otherwise it goes onto
  -- the plain list (reply 0) and the worker's gate admits it there, or moves it into the
  -- backlog first ("adopt") when it found others waiting there too. A job put on the list
  -- is in transit (see hint.lua); optional ARGV: how long its entry lasts (ms; 0: none).
  local lane, tenant, priority, id, cost, list_key, at_front =
    ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], ARGV[A + 6], ARGV[A + 7] == '1'
  local lasts = tonumber(ARGV[A + 8] or '')
  local now = now_ms()
  local parked = P_PARKED .. lane
  -- Jobs already waiting on the plain list are older: a new job queues behind them there
  -- (workers move that list into the backlog, in order, with "adopt").
  local contended = redis.call('LLEN', list_key) == 0 and (
    redis.call('ZCARD', P_ACTIVE .. lane) > 0
    or redis.call('ZCOUNT', parked, '-inf', now) > 0
    or redis.call('ZSCORE', parked, tenant))
  if not contended then
    redis.call(at_front and 'LPUSH' or 'RPUSH', list_key, id)
    if lasts and lasts > 0 then in_transit(transit_key(lane, tenant), id, now, now + lasts) end
    return 0
  end
  if not known_priority(priority) then priority = 'normal' end
  if redis.call('HSETNX', meta_key, id, record(lane, tenant, priority, cost, now, false)) == 1 then
    redis.call('SADD', lanes_key, lane)
    enqueue(id, at_front)  -- a retry asked back to the front goes to the head of its class
  end
  return 1
end

if mode == 'adopt' then
  -- Move jobs waiting on a queue system's own list (RQ's) into the lane's fair backlog, in
  -- list order: they are newer than the backlog's jobs of their class (route sends a job to
  -- the list while the list is not empty). ARGV: lane, list key, then id, tenant, priority,
  -- cost for each job, oldest first; an empty tenant only takes the id off the list (its job
  -- is gone). An id no longer on the list (another worker took it) is skipped, and one the
  -- scheduler already holds is only taken off the list. Reply: jobs moved into the backlog.
  local lane, list_key = ARGV[A + 1], ARGV[A + 2]
  local now, moved = now_ms(), 0
  for i = A + 3, #ARGV - 3, 4 do
    local id, tenant, priority, cost = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    if redis.call('LREM', list_key, 1, id) == 1 and tenant ~= '' then
      redis.call('ZREM', transit_key(lane, tenant), id)  -- off RQ's list, into the backlog
      if not known_priority(priority) then priority = 'normal' end
      if redis.call('HSETNX', meta_key, id, record(lane, tenant, priority, cost, now, false)) == 1 then
        enqueue(id, false)
        moved = moved + 1
      end
    end
  end
  if moved > 0 then redis.call('SADD', lanes_key, lane) end
  return moved
end

if mode == 'dispatch' then
  -- KEYS[8] (optional): the receipt key. ARGV: max items, lease ms (or "0 <slot hold ms>":
  -- no lease), max tenants skipped per lane, want payload ("1"/"0"), receipt nonce ("" for
  -- none), lanes...
  -- A lane may be given as "<lane>|<list key>": a dispatched id is then pushed onto that
  -- list (a queue system's own in-progress bookkeeping, e.g. RQ's intermediate queue).
  -- With lease 0 no in-flight record is kept: the item is handed over for good. The receipt
  -- key is set to "<nonce> <id>..." when something is dispatched, so a caller whose reply
  -- was lost (Redis restarted, the connection dropped) can find out what it was handed.
  -- Reply: {wait_ms, {id, lane, tenant, priority, cost, payload, lease}...}; wait_ms is "0"
  -- when something was dispatched, "-1" when every lane is empty, else the ms until the
  -- earliest moment something could be admitted. `lease` is the token that ack, nack and
  -- extend present for the item ("" without a lease): one per dispatch call, never reused.
  -- An item under concurrency caps takes their slots with its tokens, held as long as its
  -- lease (or the slot hold), and carries an 8th element "<slot token> <cap scope> ...".
  -- The first element goes on, after a space, with " <lane> <tenant> <binding>" for each
  -- tenant this call held back (parked, or met a queue, global or priority scope that
  -- denied): the binding as a decision names it (denied_text: "tenant:acme(10000/d)",
  -- "!<cap scope>", "~<paused scope>"), so a worker can say which window holds its parked
  -- work back without asking again. Bounded: a lane judges at most max_skips + 1 tenants.
  local max_items, max_skips, want_payload = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 3]), ARGV[A + 4] == '1'
  local lease_ms, hold_ms = string.match(ARGV[A + 2], '^(%S+) ?(%S*)$')
  lease_ms = tonumber(lease_ms)
  hold_ms = lease_ms > 0 and lease_ms or tonumber(hold_ms) or 60000
  local now, horizon = lease_clock(hold_ms)
  if reap(now, horizon) == REAP_BATCH and redis.call('ZCOUNT', inflight_key, '-inf', horizon) > 0 then
    -- More leases ran out than one call hands back. They go back newest first, each to the
    -- head of its backlog, so the oldest end up in front as they were; serving before the
    -- rest are back would serve newer work first. Nothing now; the caller comes back at once.
    return {'0'}
  end
  local version = redis.call('HGET', config_key, '_version') or '0'
  local items, wait, backlogged, stop_all = {}, false, false, false
  -- Priorities denied by their priority scope (a cap on all work of that priority, or its
  -- pause) in this call: priority -> ms it admits again. Their classes are passed over, so
  -- the other priorities share what the caps leave (priority scopes span every lane).
  local held, held_by = {}, {}
  local lease, leases, token = '', {}, ''
  -- " <lane> <tenant> <binding>" per tenant held back, appended to the reply's first element
  -- (once in a row: a tenant denied by a priority scope is then parked for it).
  local why = {}
  local function held_back(lane, tenant, binding)
    local entry = ' ' .. lane .. ' ' .. tenant .. ' ' .. binding
    if why[#why] ~= entry then why[#why + 1] = entry end
  end
  local function note_wait(w)
    if not wait or w < wait then wait = w end
  end
  local receipt_key, nonce = KEYS[8], ARGV[A + 5]
  for li = A + 6, #ARGV do
    local lane, handoff = string.match(ARGV[li], '^([^|]+)|?(.*)$')
    local active, parked, counts = P_ACTIVE .. lane, P_PARKED .. lane, P_COUNTS .. lane
    -- A tenant is parked until its tokens return under the limits it was judged by; after
    -- any configuration change (a raised cap, an exemption) every parked tenant is due now.
    if redis.call('EXISTS', parked) == 1 and redis.call('HGET', counts, ':cv') ~= version then
      redis.call('ZUNIONSTORE', parked, 1, parked, 'WEIGHTS', 0)
    end
    -- Tenants whose own tokens are back rejoin at the current virtual time.
    local woken = redis.call('ZRANGEBYSCORE', parked, '-inf', now, 'LIMIT', 0, UNPARK_BATCH)
    for _, tenant in ipairs(woken) do
      redis.call('ZREM', parked, tenant)
      join_tenant(lane, tenant)
    end
    local skips, blocked, drained = 0, false, false
    -- Parks `tenant` until `due` (ms) so that it costs nothing until then; past max_skips
    -- parked in one call the lane stops for this call (bounded work).
    local function park(tenant, due)
      redis.call('ZREM', active, tenant)
      redis.call('ZADD', parked, due, tenant)
      redis.call('HSET', counts, ':cv', version)
      skips = skips + 1
      if skips > max_skips then
        note_wait(0)
        blocked = true
      end
    end
    -- The lane's clock, read without starting an epoch (an empty lane stays without a hash).
    local clock = redis.call('HMGET', counts, ':gv', ':ep', ':jb')
    local gv, vt, stride = finite(tonumber(clock[1])), false, false
    local budget = tonumber(clock[3]) or JUMP_BUDGET
    local tag = clock[2] and '@' .. clock[2] or ''
    while #items < max_items and not blocked do
      local top = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
      if #top == 0 then
        drained = true
        break
      end
      local tenant, pass = top[1], finite(tonumber(top[2]))
      local tp = classes_key(lane, tenant)
      local priority, ppass, first_held = pick_priority(tp, held)
      if priority == nil then
        redis.call('ZREM', active, tenant)  -- nothing left: defensive, keeps the set honest
        settle_tenant(counts, tenant)
      elseif not priority then
        -- Every priority the tenant has waiting is held by its priority scope: the tenant
        -- is parked until the first is due (ppass), as one held back by its own caps.
        held_back(lane, tenant, held_by[first_held])
        park(tenant, ppass)
      else
        local bl = backlog_key(lane, tenant, priority)
        local id = redis.call('LINDEX', bl, 0)
        local _, cost, stored
        if id then
          _, _, _, cost, _, stored = split_meta(redis.call('HGET', meta_key, id))
          if cost and stored and want_payload and redis.call('HEXISTS', payload_key, id) == 0 then
            cost = nil  -- its payload is gone: there is nothing to run
          end
          if not cost then
            -- Lost (its record or payload was evicted): drop it and look again.
            redis.call('LPOP', bl)
            redis.call('ZREM', P_AGE .. lane, id)
            lose(id)
            taken(counts, tenant)
            id = nil
          end
        end
        if not id then
          if redis.call('LLEN', bl) == 0 then redis.call('ZREM', tp, priority) end
          if redis.call('EXISTS', tp) == 0 then
            redis.call('ZREM', active, tenant)
            settle_tenant(counts, tenant)
          end
        else
          local ctx = load(config_key, tenant_key(tenant), shared_key, tenant, lane, priority,
            {'weight:tenant:' .. tenant, 'weight:tenant:*', 'weight:priority:' .. priority})
          -- An item costlier than a bucket's burst (the limit was lowered after it was
          -- queued) is admitted when that bucket is full, rather than never.
          local charge = cost
          for _, b in ipairs(ctx.buckets) do
            if not b.shadow and b.burst < charge then charge = b.burst end
          end
          local status, wait_us, denied_by, would_deny = judge(ctx, charge)
          if status > 0 then
            redis.call('LPOP', bl)
            redis.call('ZREM', P_AGE .. lane, id)
            -- Deadlines of one batch are 1 us apart in dispatch order: reap() hands items
            -- back by deadline, and equal deadlines would come back in id order instead.
            if handoff ~= '' then redis.call('RPUSH', handoff, id) end
            local slot = ''
            if status == 2 or lease_ms > 0 then
              if token == '' then token = tostring(redis.call('HINCRBY', shared_key, 'n:lease', 1)) end
            end
            if status == 2 then
              slot = take_slots(ctx, token .. '/' .. id, ctx.now + hold_ms * 1000 + #items)
            end
            if lease_ms > 0 then
              redis.call('ZADD', inflight_key, now + lease_ms + #items / 1000, id)
              lease = token
              leases[#leases + 1] = id
              leases[#leases + 1] = slot == '' and lease or lease .. ' ' .. slot
            end
            local wt = weight(ctx.cfg_extra[1], weight(ctx.cfg_extra[2], 1))
            local wp = weight(ctx.cfg_extra[3], DEFAULT_PRIORITY_WEIGHTS[priority] or 1)
            local new_pass, new_ppass = pass + charge / wt, ppass + charge / wp
            -- The fair clock runs at the pace of fair service: serving `charge` to one of n
            -- backlogged tenants moves it charge / (weight x n). Over a round, in which
            -- each tenant is served in proportion to its weight, that is what every pass
            -- moved. (With ':vt' alone, tenants joining below it and served at once kept
            -- it still, and one new tenant per dispatch kept every waiting one out.) The
            -- first service of a tenant that joined at the clock (its pass is not its own
            -- from its last service) is free while the lane's budget lasts (it refills by
            -- JUMP_REFILL a service): a quiet tenant served now and then would otherwise
            -- move the clock ahead of the tenants that wait, a little each time, until it
            -- lost its place in front; a stream of new tenants soon spends the budget.
            budget = math.min(JUMP_BUDGET, budget + JUMP_REFILL)
            local own = own_pass(redis.call('HGET', tenant_key(tenant), 'sp:' .. lane), clock[2] or '')
            if own ~= pass and budget >= 1 then
              budget = budget - 1
            else
              gv = math.max(gv, pass) + charge / (wt * math.max(1, redis.call('ZCARD', active)))
            end
            vt, stride = pass, charge / wt
            taken(counts, tenant)
            if redis.call('LLEN', bl) == 0 then
              redis.call('ZREM', tp, priority)
            else
              redis.call('ZADD', tp, new_ppass, priority)
            end
            if redis.call('EXISTS', tp) == 0 then
              redis.call('ZREM', active, tenant)
              settle_tenant(counts, tenant)
            else
              redis.call('ZADD', active, new_pass, tenant)
            end
            admit(ctx, charge, would_deny, keep_ms,
              {'sp:' .. lane, fmt(new_pass) .. tag, 'pp:' .. lane .. ':' .. priority, fmt(new_ppass), 'pv:' .. lane, fmt(ppass)})
            local payload = want_payload and redis.call('HGET', payload_key, id) or false
            if lease_ms <= 0 then
              redis.call('HDEL', meta_key, id)
              redis.call('HDEL', payload_key, id)
            end
            items[#items + 1] = {id, lane, tenant, priority, fmt(cost), payload or '', lease,
                                 slot == '' and '' or token .. '/' .. id .. ' ' .. slot}
          elseif is_tenant_scope(denied_by) then
            -- Held back by its own cap: park it so it costs nothing until its tokens return
            -- (a concurrency cap: until its earliest slot lease runs out, or a release).
            held_back(lane, tenant, denied_text(ctx, denied_by))
            deny(ctx, denied_by, wait_us / 1000, keep_ms)
            if ctx.by_cap then
              -- Woken by a release of that cap's slots; kept at least until the wait ends.
              local waiters, keep = P_WAKE .. denied_by, math.floor(wait_us / 1000) + 60000
              redis.call('SADD', waiters, lane .. ' ' .. tenant)
              if redis.call('PTTL', waiters) < keep then redis.call('PEXPIRE', waiters, keep) end
            end
            park(tenant, now + wait_us / 1000)
          elseif is_priority_scope(denied_by) then
            -- A priority scope binds that priority everywhere: its classes are passed
            -- over (this call) until it admits again; the tenant's others go on.
            held_by[priority] = denied_text(ctx, denied_by)
            held_back(lane, tenant, held_by[priority])
            deny(ctx, denied_by, wait_us / 1000, keep_ms)
            held[priority] = now + wait_us / 1000
          else
            -- A queue or global cap binds everyone in this lane (global: every lane).
            held_back(lane, tenant, denied_text(ctx, denied_by))
            deny(ctx, denied_by, wait_us / 1000, keep_ms)
            note_wait(wait_us / 1000)
            blocked = true
            stop_all = denied_by == 'global'
          end
        end
      end
    end
    if vt then
      redis.call('HSET', counts, ':vt', fmt(vt), ':gv', fmt(gv), ':st', fmt(stride), ':jb', fmt(budget))
    end
    local first = redis.call('ZRANGE', parked, 0, 0, 'WITHSCORES')
    if #first > 0 then
      backlogged = true
      note_wait(math.max(0, tonumber(first[2]) - now))
    elseif not drained and redis.call('EXISTS', active) == 1 then
      backlogged = true
    else
      -- Nothing is scheduled in this lane. Tenants its counts still name were lost from the
      -- schedule (an evicted set): those whose classes remain rejoin; the backlog of the
      -- rest is gone (counted as lost). (Normally the hash holds only its ':' fields.)
      local counted, rejoined, stale = redis.call('HGETALL', counts), false, false
      for i = 1, #counted, 2 do
        local field = counted[i]
        if string.sub(field, 1, 1) ~= ':' then
          stale = true
          if redis.call('EXISTS', classes_key(lane, field)) == 1 then
            join_tenant(lane, field)
            rejoined = true
          else
            settle_tenant(counts, field)
          end
        elseif field == ':total' and counted[i + 1] ~= '0' then
          stale = true
        end
      end
      if rejoined then
        backlogged = true
      elseif stale then
        redis.call('HSET', counts, ':total', 0)
        redis.call('DEL', P_AGE .. lane)
      elseif redis.call('EXISTS', P_AGE .. lane) == 1 then
        redis.call('DEL', P_AGE .. lane)  -- only entries of items lost with their backlog
      end
      if not rejoined then forget_lane(lane) end
    end
    if stop_all or #items >= max_items then break end
  end
  if #leases > 0 then redis.call('HSET', lease_key, unpack(leases)) end
  if receipt_key and nonce ~= '' and #items > 0 then
    local ids = {nonce}
    for _, item in ipairs(items) do ids[#ids + 1] = item[1] end
    redis.call('SET', receipt_key, table.concat(ids, ' '), 'PX', RECEIPT_MS)
  end
  local head
  if #items > 0 then head = '0' elseif wait then head = fmt(wait) elseif backlogged then head = '0' else head = '-1' end
  local reply = {#why > 0 and head .. table.concat(why) or head}
  for _, item in ipairs(items) do reply[#reply + 1] = item end
  return reply
end

-- Whether the caller holds the item's current lease: any holder when no token is given
-- (callers that keep none), else only the one whose token the dispatch handed out. Also
-- returns the lease's own token and the cap scopes whose slots it holds ("" for none).
-- With one of the two records evicted, the other decides: a lease record without the
-- in-flight entry is still this holder's (nothing reaped it), an in-flight entry without a
-- lease record is anyone's.
local function holds(id, token)
  local rec = redis.call('HGET', lease_key, id)
  if not rec and not redis.call('ZSCORE', inflight_key, id) then return false end
  local lease, scopes = string.match(rec or '', '^(%S*) ?(.*)$')
  if rec and token ~= nil and token ~= '' and lease ~= token then return false end
  if not rec then lease = token or '' end
  return true, lease, scopes
end

-- The item's concurrency slots go back (once: the in-flight record is closed with them).
-- `horizon`: lease_clock's (slots whose hold ran out in a silence are still live).
local function release_item_slots(id, lease, scopes, horizon)
  if scopes ~= '' then release_slots(prefix, lease .. '/' .. id, words(scopes), horizon * 1000, waking()) end
end

if mode == 'ack' or mode == 'nack' then
  -- KEYS[8] (ack): the item's done marker. ARGV: item id, requeue ("1"/"0"), refund
  -- ("1"/"0"), done-marker ttl ms ("0": none), lease token (optional), keep slots ("1", ack
  -- only). Reply: 1 closed, 0 not in flight for this caller (its lease ran out: the item
  -- was handed back, maybe to another worker since; or the id is unknown), 2 (ack) closed
  -- already under this same lease token: an ack sent again because the reply to the first
  -- was lost (the first closed it). The done marker lets submit recognise a broker
  -- redelivery of work that already ran through the backlog; it holds the lease token.
  local id, requeue, refund = ARGV[A + 1], ARGV[A + 2] == '1', ARGV[A + 3] == '1'
  local done_ms = tonumber(ARGV[A + 4] or '0')
  local token = ARGV[A + 5]
  local _, horizon = lease_clock()
  local held, lease, scopes = holds(id, token)
  if not held then
    if mode == 'ack' and token and token ~= '' and KEYS[8] and redis.call('GET', KEYS[8]) == token then
      return 2
    end
    return 0
  end
  redis.call('ZREM', inflight_key, id)
  redis.call('HDEL', lease_key, id)
  -- ARGV "keep slots" = "1": the job has started and runs on; its slots stay held (the
  -- worker renews them, and gives them back when the job ends: Limiter.extend_slot / release).
  if mode == 'nack' or ARGV[A + 6] ~= '1' then release_item_slots(id, lease, scopes, horizon) end
  if done_ms and done_ms > 0 and not requeue and KEYS[8] then
    redis.call('SET', KEYS[8], lease ~= '' and lease or '1', 'PX', done_ms)
  end
  if mode == 'nack' and refund then
    local lane, tenant, priority, cost = split_meta(redis.call('HGET', meta_key, id))
    if lane then
      credit(load(config_key, tenant_key(tenant), shared_key, tenant, lane, priority), cost, keep_ms)
    end
  end
  if mode == 'nack' and requeue then
    if not enqueue(id, true) then lose(id) end
  else
    redis.call('HDEL', meta_key, id)
    redis.call('HDEL', payload_key, id)
  end
  return 1
end

if mode == 'extend' then
  -- ARGV: item id, lease ms, lease token (optional). Reply: 1 extended, 0 not in flight
  -- for this caller.
  -- The item's concurrency slots are renewed with it (while they are still held).
  -- A lease that ran out in a silence and was not taken back yet (its grace lasts) is
  -- renewed as any other: nothing else holds it.
  local id, lease_ms = ARGV[A + 1], tonumber(ARGV[A + 2])
  local now, horizon = lease_clock(lease_ms)
  local held, lease, scopes = holds(id, ARGV[A + 3])
  if not held then return 0 end
  redis.call('ZADD', inflight_key, now + lease_ms, id)
  if scopes ~= '' then
    extend_slots(prefix, lease .. '/' .. id, words(scopes), horizon * 1000, (now + lease_ms) * 1000,
                 waking())
  end
  return 1
end

if mode == 'reap' then
  return reap(lease_clock())
end

if mode == 'purge' then
  -- Drop the work waiting in a lane's backlog: every tenant's, or one tenant's. ARGV: lane,
  -- tenant ("" for every tenant), at most this many items per call. Items in flight (handed
  -- out, not yet acked) are not waiting and are left alone. Counts, classes, the active and
  -- parked sets and the age index are kept true as items go; a tenant left with nothing
  -- leaves the schedule, and a lane left with nothing is forgotten (forget_lane).
  -- Reply: {more ("1": call again, the limit was reached), id...} the ids dropped, whose
  -- records and payloads are gone.
  local lane, only, limit = ARGV[A + 1], ARGV[A + 2], math.floor(tonumber(ARGV[A + 3]) or 0)
  if limit < 1 then return redis.error_reply('queue-ratelimit: purge limit must be >= 1') end
  local active, parked, counts, age = P_ACTIVE .. lane, P_PARKED .. lane, P_COUNTS .. lane, P_AGE .. lane
  local tenants = {only}
  if only == '' then
    -- A bounded slice of the schedule per call: a tenant emptied leaves it, so the next
    -- call goes on with the rest. With nothing scheduled, the counts name what is left.
    tenants = redis.call('ZRANGE', active, 0, limit - 1)
    for _, t in ipairs(redis.call('ZRANGE', parked, 0, limit - 1)) do tenants[#tenants + 1] = t end
    if #tenants == 0 then
      local counted = redis.call('HKEYS', counts)
      for _, field in ipairs(counted) do
        if string.sub(field, 1, 1) ~= ':' then tenants[#tenants + 1] = field end
      end
    end
  end
  local reply, more = {'0'}, false
  for _, tenant in ipairs(tenants) do
    local tp = classes_key(lane, tenant)
    local dropped = 0
    for _, priority in ipairs(redis.call('ZRANGE', tp, 0, -1)) do
      local room = limit - (#reply - 1)
      if room < 1 then break end
      local bl = backlog_key(lane, tenant, priority)
      local ids = redis.call('LRANGE', bl, 0, room - 1)
      if #ids > 0 then
        redis.call('LTRIM', bl, #ids, -1)
        redis.call('ZREM', age, unpack(ids))
        for _, id in ipairs(ids) do
          -- An id also in flight (only after broken data) keeps the record its holder needs.
          if not redis.call('ZSCORE', inflight_key, id) then
            redis.call('HDEL', meta_key, id)
            redis.call('HDEL', payload_key, id)
          end
          reply[#reply + 1] = id
        end
        dropped = dropped + #ids
      end
      if redis.call('EXISTS', bl) == 0 then redis.call('ZREM', tp, priority) end
    end
    if dropped > 0 then
      if redis.call('HINCRBY', counts, tenant, -dropped) <= 0 then redis.call('HDEL', counts, tenant) end
      if redis.call('HINCRBY', counts, ':total', -dropped) < 0 then redis.call('HSET', counts, ':total', 0) end
    end
    if redis.call('EXISTS', tp) == 0 then
      redis.call('ZREM', active, tenant)
      redis.call('ZREM', parked, tenant)
      settle_tenant(counts, tenant)  -- a count left over was of items lost before (evicted)
    else
      more = true
    end
  end
  if only == '' and (redis.call('EXISTS', active) == 1 or redis.call('EXISTS', parked) == 1) then
    more = true
  end
  if more then
    reply[1] = '1'
  else
    if only == '' and redis.call('HGET', counts, ':total') then redis.call('HSET', counts, ':total', 0) end
    forget_lane(lane)
  end
  return reply
end

return redis.error_reply('queue-ratelimit: unknown scheduler mode ' .. tostring(mode))
