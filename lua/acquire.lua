-- acquire.lua: check, consume (or peek, or refund) every bucket that applies to one job,
-- all-or-nothing, in one round trip, on Redis's clock. Prefixed with buckets.lua.
--
-- KEYS: config hash, tenant hash, shared hash
-- ARGV: mode ("acquire" | "peek" | "refund"), tenant, queue ("" for none),
--       cost, priority ("" for none), counter retention in ms
-- Reply: {status, wait_ms, denied_by, {scope, remaining, ...}, {would-deny scope, ...}}
--   status 1 allowed, 0 denied, -1 cost exceeds the burst of scope `denied_by` (wait = burst)
local config_key, tenant_key, shared_key = KEYS[1], KEYS[2], KEYS[3]
local mode, tenant, queue = ARGV[1], ARGV[2], ARGV[3]
local cost, priority, keep_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])

local buckets = plan_buckets(config_key, tenant, queue)
if buckets.err then return buckets end

-- Bucket state and the counters this decision may bump, in one HMGET per hash.
local tfields, sfields = state_fields(buckets)
local nt, ns = #tfields, #sfields
for _, f in ipairs({'x', 'n:a', 'n:at'}) do tfields[#tfields + 1] = f end
for _, f in ipairs({'n:a', 'n:at'}) do sfields[#sfields + 1] = f end
if queue ~= '' then
  tfields[#tfields + 1] = 'a:q:' .. queue
  sfields[#sfields + 1] = 'a:q:' .. queue
end
if priority ~= '' then sfields[#sfields + 1] = 'a:p:' .. priority end
local tvals = redis.call('HMGET', tenant_key, unpack(tfields))
local svals = redis.call('HMGET', shared_key, unpack(sfields))

local now = clock_us()
refill(buckets, tvals, svals, now)

if mode == 'refund' then
  for _, b in ipairs(buckets) do b.tokens = math.min(b.burst, b.tokens + cost) end
else
  local status, wait, denied_by, would_deny = judge(buckets, cost)
  if status == -1 then
    for _, b in ipairs(buckets) do
      if b.scope == denied_by then return {-1, fmt(b.burst), denied_by, {}, {}} end
    end
  end
  if mode == 'peek' then
    return {status, fmt(wait / 1000), denied_by or '', remaining_list(buckets), would_deny}
  end
  if status == 0 then
    record_denial(tenant_key, shared_key, denied_by, wait / 1000, tvals[nt + 1], now / 1000, keep_ms)
    return {0, fmt(wait / 1000), denied_by, remaining_list(buckets), would_deny}
  end
  for _, b in ipairs(buckets) do
    -- A shadow bucket spends only what it could have granted: it models the enforced
    -- limiter, which would have turned the rest away.
    if b.ok or not b.shadow then b.tokens = b.tokens - cost end
  end
  record_would_deny(tenant_key, shared_key, would_deny)
  local targs, sargs = {}, {}
  -- Counters are read above and written back with the bucket state: one write per hash.
  local ti = nt + 2
  targs[1], targs[2] = 'n:a', (tonumber(tvals[ti]) or 0) + 1
  targs[3], targs[4] = 'n:at', fmt((tonumber(tvals[ti + 1]) or 0) + cost)
  local si = ns + 1
  sargs[1], sargs[2] = 'n:a', (tonumber(svals[si]) or 0) + 1
  sargs[3], sargs[4] = 'n:at', fmt((tonumber(svals[si + 1]) or 0) + cost)
  si = si + 2
  if queue ~= '' then
    targs[5], targs[6] = 'a:q:' .. queue, (tonumber(tvals[ti + 2]) or 0) + 1
    sargs[5], sargs[6] = 'a:q:' .. queue, (tonumber(svals[si]) or 0) + 1
    si = si + 1
  end
  if priority ~= '' then
    sargs[#sargs + 1] = 'a:p:' .. priority
    sargs[#sargs + 1] = (tonumber(svals[si]) or 0) + 1
  end
  local full_ms = write_fields(buckets, now, targs, sargs)
  local x = extend_expiry(tenant_key, tvals[nt + 1], math.max(full_ms, now / 1000), keep_ms, targs)
  redis.call('HSET', tenant_key, unpack(targs))
  if x then redis.call('PEXPIREAT', tenant_key, x) end
  redis.call('HSET', shared_key, unpack(sargs))
  return {1, '0', '', remaining_list(buckets), would_deny}
end

-- refund: put tokens back (never above burst); counters untouched.
local targs, sargs = {}, {}
local full_ms = write_fields(buckets, now, targs, sargs)
local x = extend_expiry(tenant_key, tvals[nt + 1], math.max(full_ms, now / 1000), keep_ms, targs)
if #targs > 0 then redis.call('HSET', tenant_key, unpack(targs)) end
if x then redis.call('PEXPIREAT', tenant_key, x) end
if #sargs > 0 then redis.call('HSET', shared_key, unpack(sargs)) end
return {1, '0', '', remaining_list(buckets), {}}
