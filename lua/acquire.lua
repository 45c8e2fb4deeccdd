-- acquire.lua: check, consume (or peek, or refund) every bucket that applies to one job,
-- all-or-nothing, in one round trip, on Redis's clock. Prefixed with buckets.lua.
--
-- KEYS: config hash, tenant hash, shared hash
-- ARGV: mode ("acquire" | "peek" | "refund"), tenant, queue ("" for none),
--       cost, priority ("" for none), counter retention in ms
-- Reply: one string (a flat reply costs the client far less to parse than nested arrays;
-- names never contain spaces):
--   "<status> <wait_ms> <denied_by or -> <scope> <remaining> ... | <would-deny scope> ..."
--   status 1 allowed, 0 denied, -1 cost exceeds the burst of scope `denied_by` (wait = burst)
local mode, tenant, queue = ARGV[1], ARGV[2], ARGV[3]
local cost, priority, keep_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])

local ctx = load(KEYS[1], KEYS[2], KEYS[3], tenant, queue, priority, {}, {})

local function reply(status, wait_ms, denied_by, would_deny)
  local parts = {status, wait_ms, denied_by or '-'}
  local n = 3
  local buckets = ctx.buckets
  for i = 1, #buckets do
    local tokens = buckets[i].tokens
    if not (tokens > 0) then tokens = 0 end
    parts[n + 1], parts[n + 2] = buckets[i].scope, fmt(tokens)
    n = n + 2
  end
  parts[n + 1] = '|'
  for i = 1, #would_deny do parts[n + 1 + i] = would_deny[i] end
  return table.concat(parts, ' ')
end

if mode == 'refund' then
  credit(ctx, cost, keep_ms)
  return reply('1', '0', false, {})
end

local status, wait, denied_by, would_deny = judge(ctx, cost)
if status == -1 then
  return '-1 ' .. fmt(burst_of(ctx, denied_by)) .. ' ' .. denied_by .. ' |'
end
if mode == 'peek' then
  return reply(tostring(status), fmt(wait / 1000), denied_by, would_deny)
end
if status == 0 then
  deny(ctx, denied_by, wait / 1000, keep_ms)
  return reply('0', fmt(wait / 1000), denied_by, would_deny)
end
admit(ctx, cost, would_deny, keep_ms, {})
return reply('1', '0', false, would_deny)
