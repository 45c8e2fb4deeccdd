-- acquire.lua: check, consume (or peek, or refund) every bucket and concurrency cap that
-- applies to one job, all-or-nothing, in one round trip, on Redis's clock (slots.lua
-- releases and renews the concurrency slots taken). Runs with buckets.lua (one Functions
-- library, or prefixed to it as an EVALSHA script).
--
-- KEYS: tenant hash, shared hash (the config hash and the tenant are read from their names:
--       buckets.lua, config_key_of and tenant_of)
-- ARGV, all optional: queue ("" for none), priority ("" for none), cost (default 1),
--       counter retention in ms ("" for the default, 15 minutes: DEFAULT_RETENTION_MS in
--       _core.py), mode ("acquire" (default) | "peek" | "refund"), slot hold in ms
--       (default 60 s: DEFAULT_HOLD in _core.py; used only where a concurrency cap
--       applies). Every argument costs the client time to send and Redis time to parse, so
--       trailing defaults are left out: most calls send none, or the queue alone.
-- Reply: one string (a flat reply costs the client far less to parse than nested arrays;
-- names never contain spaces):
--   "<status> <wait_ms> <denied_by or -> <scope> <remaining> ... | <would-deny scope> ..."
--   status 1 allowed, 0 denied, -1 cost exceeds the burst of scope `denied_by` (wait = burst),
--   2 allowed and holding concurrency slots: the reply goes on with
--   " # <slot token> <cap scope> ...". A denial by a concurrency cap names the scope as
--   "!<scope>" (its wait: until the earliest lease of that cap runs out), one by a pause
--   as "~<scope>" (its wait: the time left of the pause).
local tenant_key, shared_key = KEYS[1], KEYS[2]
local config_key = config_key_of(shared_key)
local queue, priority = ARGV[1] or '', ARGV[2] or ''
-- Numbers are checked before anything is read or written: a call that fails changes nothing.
-- (Most calls leave the trailing defaults out, and pay for no check.)
local keep_ms, cost, hold, mode, nargs = 900000, 1, 60000, 'acquire', #ARGV
if nargs > 2 then
  cost = arg_number(ARGV[3], cost, MIN_COST, MAX_COST, 'cost')
  if nargs > 3 then
    if ARGV[4] ~= '' then
      keep_ms = arg_number(ARGV[4], keep_ms, 1, MAX_KEEP_MS, 'counter retention (ms)')
    end
    if nargs > 4 then
      mode = ARGV[5]
      if mode ~= 'acquire' and mode ~= 'peek' and mode ~= 'refund' then
        error('queue-ratelimit: unknown decision mode ' .. string.sub(mode, 1, 40))
      end
      if nargs > 5 then hold = arg_number(ARGV[6], hold, 1, MAX_HOLD_MS, 'slot hold (ms)') end
    end
  end
end

-- Plans of plain buckets take the lean path (buckets.lua): its reply, or the state it
-- loaded when the general path must decide (false, ctx), or nothing (load from scratch).
local ctx
if mode == 'acquire' then
  local reply
  reply, ctx = lean_acquire(config_key, tenant_key, shared_key, queue, priority, cost, keep_ms)
  if reply then return reply end
end
-- (The tenant, false: read from the tenant hash's name if a plan must be built.)
if not ctx then ctx = load(config_key, tenant_key, shared_key, false, queue, priority) end

if mode == 'refund' then
  credit(ctx, cost, keep_ms)
  return decision_reply(ctx, '1', '0', false, NONE)
end

local status, wait, denied_by, would_deny = judge(ctx, cost)
if status == -1 then
  return '-1 ' .. fmt(burst_of(ctx, denied_by)) .. ' ' .. denied_by .. ' |'
end
if mode == 'peek' then
  return decision_reply(ctx, status > 0 and '1' or '0', fmt(wait / 1000),
                        denied_text(ctx, denied_by), would_deny)
end
if status == 0 then
  deny(ctx, denied_by, wait / 1000, keep_ms)
  return decision_reply(ctx, '0', fmt(wait / 1000), denied_text(ctx, denied_by), would_deny)
end
if status == 2 then
  -- One token for every slot this decision takes (a counter no holder had before).
  local token = fmt(redis.call('HINCRBY', shared_key, 'n:lease', 1))
  local scopes = take_slots(ctx, token, ctx.now + hold * 1000)
  admit(ctx, cost, would_deny, keep_ms, {})
  if scopes == '' then return decision_reply(ctx, '1', '0', false, would_deny) end
  return decision_reply(ctx, '2', '0', false, would_deny) .. ' # ' .. token .. ' ' .. scopes
end
admit(ctx, cost, would_deny, keep_ms, {})
return decision_reply(ctx, '1', '0', false, would_deny)
