-- gate.lua: the worker-side fast path. Runs with buckets.lua (one Functions library, or
-- prefixed to it as an EVALSHA script).
--
-- A job arriving from the broker runs at once only if nothing dispatchable waits in its
-- lane's fair backlog (otherwise it would overtake work that is queued fairly) and every
-- bucket admits it. Everything else is parked in the backlog by the caller (scheduler.lua
-- "submit") and re-admitted in fair order by "dispatch".
--
-- Credit: the caller may ask for up to `credit` more units of the same cost, taken now, to
-- admit the same tenant's next jobs on that lane without a round trip. It is granted only
-- while every enforced bucket stays at least half full afterwards, i.e. when nothing is
-- contended, so it never takes tokens someone else is waiting for; the caller refunds what
-- it does not use. Caps hold: every credited token is taken from the buckets here.
--
-- Concurrency caps: a job admitted here also takes a slot of every cap that applies, held
-- for `hold` ms unless released sooner (Limiter.release with the token); no credit is
-- granted then (every job needs a slot of its own).
--
-- Transit: a job a producer's hint counted as in transit (hint.lua) has arrived.
-- Its entry goes when it runs (or is a duplicate); one to be parked keeps it until "submit"
-- counts it in the backlog, so it is counted all along. (Jobs admitted on credit pass no
-- gate: the worker takes their entries off itself, by id: celery/_credit.py.)
--
-- KEYS: config, shared, scheduler meta hash, the lane's active and parked sets, the
--       tenant's hash, the item's done marker, the tenant's transit set in the lane (all
--       named by KeySpace; the transit set is optional)
-- ARGV: counter retention ms, lane, tenant, priority, item id, cost, credit, slot hold ms
--       (default 60 s)
-- Reply: {1, credit granted} run now, or {1, 0, "<slot token> <cap scope> ..."} holding
--        slots; {0, wait_ms, denied_by} park it ("" denied_by: the lane has a backlog;
--        a 4th element "1" when denied_by is a concurrency cap, "2" when it is a pause,
--        and a 5th, the window that bound ("10000/d"), when denied_by has several);
--        {2} a duplicate: already parked, in flight or done.
local config_key, shared_key, meta_key, active_key, parked, tenant_key, done_key, transit =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local lane, tenant, priority, id = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
-- Numbers are checked before anything is read or written: a call that fails changes nothing.
local keep_ms = arg_number(ARGV[1], 900000, 1, MAX_KEEP_MS, 'counter retention (ms)')
local cost = arg_number(ARGV[6], 1, MIN_COST, MAX_COST, 'cost')
local credit = math.floor(arg_number(ARGV[7], 0, 0, MAX_CREDIT, 'credit'))
local hold = arg_number(ARGV[8], 60000, 1, MAX_HOLD_MS, 'slot hold (ms)')

if redis.call('HEXISTS', meta_key, id) == 1 or redis.call('EXISTS', done_key) == 1 then
  if transit then redis.call('ZREM', transit, id) end
  return {2}
end
-- Work waiting in the lane that could be dispatched now goes first. Tenants parked by their
-- own caps cannot run anyway, so a job from anyone else may pass them.
if redis.call('ZCARD', active_key) > 0 then
  return {0, '0', ''}
end
local t = redis.call('TIME')
if redis.call('ZCOUNT', parked, '-inf', tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000) > 0 then
  return {0, '0', ''}
end
-- The tenant's own queued jobs go before its new ones.
local wake = redis.call('ZSCORE', parked, tenant)
if wake then
  return {0, fmt(math.max(0, tonumber(wake) - (tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000))), 'tenant:' .. tenant}
end
local ctx = load(config_key, tenant_key, shared_key, tenant, lane, priority)
-- A cost above a burst is charged as the whole burst: a job is never refused forever.
for _, b in ipairs(ctx.buckets) do
  if not b.shadow and b.burst < cost then cost = b.burst end
end
local status, wait, denied_by, would_deny = judge(ctx, cost)
if status > 0 and transit then redis.call('ZREM', transit, id) end
if status == 2 then
  local token = fmt(redis.call('HINCRBY', shared_key, 'n:lease', 1))
  local scopes = take_slots(ctx, token, ctx.now + hold * 1000)
  admit(ctx, cost, would_deny, keep_ms, {})
  if scopes == '' then return {1, 0} end
  return {1, 0, token .. ' ' .. scopes}
end
if status == 1 then
  local extra = 0
  if credit > 0 and #ctx.buckets == 0 then
    -- No bucket applies: the credit takes nothing, and there is nothing to give back.
    admit(ctx, cost, would_deny, keep_ms, {})
    return {1, credit, '', '1'}
  end
  if credit > 0 then
    extra = credit
    for i, b in ipairs(ctx.buckets) do
      if not b.shadow then
        local spare = math.floor((ctx.tokens[i] - cost - b.burst / 2) / cost)
        if spare < extra then extra = spare end
      end
    end
    if extra < 0 then extra = 0 end
  end
  admit(ctx, cost * (1 + extra), would_deny, keep_ms, {})
  return {1, extra}
end
deny(ctx, denied_by, wait / 1000, keep_ms)
local flag = ctx.by_cap and '1' or ctx.paused and '2' or '0'
-- (The window that bound, when the denying scope has several: as acquire.lua names it.)
local bound = flag == '0' and ctx.bound
if bound and bound.window then return {0, fmt(wait / 1000), denied_by, flag, bound.window} end
return {0, fmt(wait / 1000), denied_by, flag}
