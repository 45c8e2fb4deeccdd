-- hint.lua: the producer's hint, when a job enqueued now would start. Runs with buckets.lua
-- (one Functions library, or prefixed to it as an EVALSHA script).
--
-- A script of its own rather than a scheduler.lua mode: it names the six keys it reads and
-- takes seven arguments, where a scheduler.lua call carries 26 (every mode's keys and
-- prefixes) and builds every mode's helpers first; that was most of a hint's server time
-- (docs/benchmarks.md, "Hint cost").
--
-- KEYS: config, shared, the tenant's hash, the lane's counts hash and active set, the
--       tenant's transit set in the lane (all named by KeySpace)
-- ARGV: lane, tenant, priority, cost, item id ("" for none), count it ("1": as in transit;
--       "2": only if it would start at once; "0"/absent: no), grace (ms; see below).
-- Writes nothing but the transit set.
--
-- Served next (KEYS 7-8: the tenant's classes zset in the lane and the items' record hash;
-- ARGV[8]: the prefix of its backlog lists in the lane, "<...>:bl:<lane>:<tenant>:"): the
-- job judged is the one dispatch would serve next for the tenant (scheduler.lua,
-- pick_priority), not a new one: the tenant's backlogged priority of lowest pass that its
-- priority scope does not hold back (one it holds is passed over, as dispatch does; when
-- every one is held, the one due first is named), at the cost of that class's head item,
-- with nothing ahead of it (its buckets judged as dispatch judges them now). ARGV's
-- priority and cost are used for a tenant with nothing in the backlog (or a head item whose
-- record is gone). Writes nothing.
-- Reply: "<1 starts at once | 0> <wait ms> <binding scope or -> <jobs ahead> <1 | 0>"
-- (the last: the scope is a concurrency cap, whose wait is an upper bound), then the
-- window that binds ("10000/d") when the binding scope has several.
--
-- The tenant's jobs ahead of it are those in its lane's backlog and those in transit
-- (enqueued with a hint, not yet seen by a gate: in the broker, on RQ's list). A tenant
-- bucket must hold their tokens and the job's before it starts; a queue or global bucket
-- also serves the other tenants backlogged in the lane, about one job of each per job of
-- this tenant in fair order (equal weights assumed), at most all they have. Each job ahead
-- is taken to cost what this one does. A counted entry lapses twice the predicted wait plus
-- the grace after now: a job the broker or RQ lost (purged, deleted) stops counting then,
-- while one that is served as predicted is taken off by its gate (gate.lua, scheduler.lua
-- "adopt") long before.
local config_key, shared_key, tenant_key, counts_key, active, transit =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local lane, tenant, priority, id = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
-- Numbers are checked before anything is read or written: a call that fails changes nothing.
local cost = arg_number(ARGV[4], 1, MIN_COST, MAX_COST, 'cost')
local count = ARGV[6] or '0'
local grace = arg_number(ARGV[7], 300000, 0, MAX_KEEP_MS, 'grace (ms)')
local backlogs = ARGV[8]

if backlogs and backlogs ~= '' then
  local classes_key, meta_key = KEYS[7], KEYS[8]
  -- A head item's cost as dispatch charges it: at most the smallest enforced burst (a
  -- costlier item is admitted when that bucket is full).
  local function charged(ctx, head_cost)
    for _, b in ipairs(ctx.buckets) do
      if not b.shadow and b.burst < head_cost then head_cost = b.burst end
    end
    return head_cost
  end
  local first = false  -- {wait, denied_by, by_cap, window} of the held class due first
  for _, prio in ipairs(redis.call('ZRANGE', classes_key, 0, -1)) do
    local head = redis.call('LINDEX', backlogs .. prio, 0)
    if head then
      local rec = redis.call('HGET', meta_key, head)
      local head_cost = tonumber(rec and string.match(rec, '^%S+ %S+ %S+ (%S+) ') or '') or cost
      local ctx = load(config_key, tenant_key, shared_key, tenant, lane, prio)
      local wait, denied_by, by_cap, window = hint_judge(ctx, charged(ctx, head_cost), 0, 0)
      if not (denied_by and string.sub(denied_by, 1, 9) == 'priority:') then
        return hint_reply(wait, denied_by, 0, by_cap, window)
      end
      -- Its priority scope holds it back: dispatch passes the class over this time.
      if not first or wait < first[1] then first = {wait, denied_by, by_cap, window} end
    end
  end
  if first then return hint_reply(first[1], first[2], 0, first[3], first[4]) end
  local ctx = load(config_key, tenant_key, shared_key, tenant, lane, priority)
  local wait, denied_by, by_cap, window = hint_judge(ctx, charged(ctx, cost), 0, 0)
  return hint_reply(wait, denied_by, 0, by_cap, window)
end

local ctx = load(config_key, tenant_key, shared_key, tenant, lane, priority)
local now = ctx.now / 1000  -- ms, on the clock load read (one TIME per call)
local ahead = redis.call('ZCOUNT', transit, '(' .. now, '+inf')
if id ~= '' and ahead > 0 and redis.call('ZSCORE', transit, id) then ahead = ahead - 1 end
local counted = redis.call('HMGET', counts_key, tenant, ':total')
local queued = tonumber(counted[1]) or 0
ahead = ahead + queued
local rivals = redis.call('ZCARD', active)
if rivals > 0 and redis.call('ZSCORE', active, tenant) then rivals = rivals - 1 end
local others = math.min(math.max(0, (tonumber(counted[2]) or 0) - queued), rivals * (ahead + 1))
local wait, denied_by, by_cap, window = hint_judge(ctx, cost, ahead, others)
if id ~= '' and (count == '1' or (count == '2' and not denied_by)) then
  in_transit(transit, id, now, now + 2 * wait / 1000 + grace)
end
return hint_reply(wait, denied_by, ahead, by_cap, window)
