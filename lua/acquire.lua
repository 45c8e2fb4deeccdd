-- acquire.lua: check, consume (or peek, or refund) every bucket and concurrency cap that
-- applies to one job, all-or-nothing, in one round trip, on Redis's clock (slots.lua
-- releases and renews the concurrency slots taken). Runs with buckets.lua (one Functions
-- library, or prefixed to it as an EVALSHA script).
--
-- KEYS: config hash, tenant hash, shared hash
-- ARGV: tenant, then optionally mode ("acquire" (default) | "peek" | "refund"), counter
--       retention in ms ("" for the default, 15 minutes: DEFAULT_RETENTION_MS in
--       _core.py), queue ("" for none), cost (default 1), priority ("" for none), slot
--       hold in ms (default 60 s: DEFAULT_HOLD in _core.py; used only where a concurrency
--       cap applies). Every argument costs the client time to send, so trailing defaults
--       are left out.
-- Reply: one string (a flat reply costs the client far less to parse than nested arrays;
-- names never contain spaces):
--   "<status> <wait_ms> <denied_by or -> <scope> <remaining> ... | <would-deny scope> ..."
--   status 1 allowed, 0 denied, -1 cost exceeds the burst of scope `denied_by` (wait = burst),
--   2 allowed and holding concurrency slots: the reply goes on with
--   " # <slot token> <cap scope> ...". A denial by a concurrency cap names the scope as
--   "!<scope>" (its wait: until the earliest lease of that cap runs out), one by a pause
--   as "~<scope>" (its wait: the time left of the pause).
local tenant, mode = ARGV[1], ARGV[2] or 'acquire'
local queue, priority = ARGV[4] or '', ARGV[6] or ''
-- Numbers are checked before anything is read or written: a call that fails changes nothing.
-- (Most calls leave the trailing defaults out, and pay for no check.)
local keep_ms, cost, hold, nargs = 900000, 1, 60000, #ARGV
if nargs > 1 then
  if mode ~= 'acquire' and mode ~= 'peek' and mode ~= 'refund' then
    error('queue-ratelimit: unknown decision mode ' .. string.sub(mode, 1, 40))
  end
  if nargs > 2 then
    if ARGV[3] ~= '' then
      keep_ms = arg_number(ARGV[3], keep_ms, 1, MAX_KEEP_MS, 'counter retention (ms)')
    end
    if nargs > 4 then
      cost = arg_number(ARGV[5], cost, MIN_COST, MAX_COST, 'cost')
      if nargs > 6 then hold = arg_number(ARGV[7], hold, 1, MAX_HOLD_MS, 'slot hold (ms)') end
    end
  end
end

-- Plans of plain buckets take the lean path (buckets.lua): its reply, or the state it
-- loaded when the general path must decide (false, ctx), or nothing (load from scratch).
local ctx
if mode == 'acquire' then
  local reply
  reply, ctx = lean_acquire(KEYS[1], KEYS[2], KEYS[3], tenant, queue, priority, cost, keep_ms)
  if reply then return reply end
end
if not ctx then ctx = load(KEYS[1], KEYS[2], KEYS[3], tenant, queue, priority) end

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
  local token = fmt(redis.call('HINCRBY', KEYS[3], 'n:lease', 1))
  local scopes = take_slots(ctx, token, ctx.now + hold * 1000)
  admit(ctx, cost, would_deny, keep_ms, {})
  if scopes == '' then return decision_reply(ctx, '1', '0', false, would_deny) end
  return decision_reply(ctx, '2', '0', false, would_deny) .. ' # ' .. token .. ' ' .. scopes
end
admit(ctx, cost, would_deny, keep_ms, {})
return decision_reply(ctx, '1', '0', false, would_deny)
