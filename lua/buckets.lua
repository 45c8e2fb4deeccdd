-- buckets.lua: token-bucket primitives shared by every script that admits work.
--
-- The Python loader prepends this file to the scripts that consume tokens, so the bucket
-- arithmetic exists once. All state of one decision lives in three hashes, whose keys share
-- the namespace's {hash tag} (one Redis Cluster slot):
--   config  <prefix>:{ns}:config     scope -> "<rate> <per> <burst> <flags>", exempt:<t>,
--                                    mode:shadow, weight:*, _version
--   tenant  <prefix>:{ns}:t:<tenant> b (tenant bucket), bq:<q> (tenant-queue bucket),
--                                    x (expiry, ms since epoch), counters; expires when idle
--   shared  <prefix>:{ns}:shared     b:global, b:queue:<q>, aggregate counters; never expires
-- A bucket value is "<tokens> <updated_us>". A missing bucket is a full one, which is why a
-- tenant hash may expire as soon as all its buckets would have refilled.

-- Redis < 5 needs this before a script may write after reading TIME; later versions always
-- replicate effects and the call is a harmless no-op (or absent, hence pcall).
pcall(redis.replicate_commands)

-- Tolerance for float rounding when comparing tokens with a cost (e.g. 0.1 + 0.2 tokens).
local EPSILON = 1e-9
-- Upper bounds (ms) of the wait-time histogram kept for denied decisions.
local WAIT_BOUNDS = {1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000}

-- Redis converts Lua numbers in replies to integers: floats travel as strings.
local function fmt(n)
  return string.format('%.17g', n)
end

-- Redis's own clock in microseconds; never the caller's, so skewed clients change nothing.
-- 2^53 microseconds is about 285 years, so the value is exact in a double.
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function parse_limit(scope, value)
  local rate, per, burst, flags = string.match(value, '^(%S+) (%S+) (%S+) (%S+)$')
  rate, per, burst = tonumber(rate), tonumber(per), tonumber(burst)
  if not (rate and per and burst) or rate <= 0 or per <= 0 or burst <= 0 then
    error('queue-ratelimit: corrupt limit for ' .. scope .. ': ' .. value)
  end
  return {rate = rate / (per * 1000000), burst = burst, shadow = string.find(flags, 's', 1, true) ~= nil}
end

local function append(list, values)
  for _, v in ipairs(values) do list[#list + 1] = v end
end

-- Load everything one decision for (tenant, queue) needs, in one HMGET per hash:
-- the limits that could apply (plus `cfg_extra` config fields), the state of the buckets
-- that do apply (plus `t_extra` tenant-hash fields), and the counters an admission bumps.
-- Buckets are listed most specific first. Returns a context table used by the functions below.
local function load(config_key, tenant_key, shared_key, tenant, queue, priority, cfg_extra, t_extra)
  local fields = {'global', 'tenant:' .. tenant, 'tenant:*', 'exempt:' .. tenant, 'mode:shadow'}
  if queue ~= '' then
    append(fields, {'queue:' .. queue, 'tenant:' .. tenant .. ':queue:' .. queue, 'tenant:*:queue:' .. queue})
  end
  local base = #fields
  append(fields, cfg_extra)
  local cfg = redis.call('HMGET', config_key, unpack(fields))
  local ctx = {tenant_key = tenant_key, shared_key = shared_key, queue = queue, priority = priority,
               buckets = {}, cfg_extra = {}, t_extra = {}}
  for i = 1, #cfg_extra do ctx.cfg_extra[i] = cfg[base + i] end

  local exempt = cfg[4] or ''
  local candidates = {}
  if exempt == '' then
    if queue ~= '' then
      candidates[#candidates + 1] = {'tenant:' .. tenant .. ':queue:' .. queue, 't', 'bq:' .. queue, cfg[7] or cfg[8]}
    end
    candidates[#candidates + 1] = {'tenant:' .. tenant, 't', 'b', cfg[2] or cfg[3]}
  end
  if exempt ~= 'all' then
    if queue ~= '' then
      candidates[#candidates + 1] = {'queue:' .. queue, 's', 'b:queue:' .. queue, cfg[6]}
    end
    candidates[#candidates + 1] = {'global', 's', 'b:global', cfg[1]}
  end
  local tfields, sfields = {}, {}
  for _, c in ipairs(candidates) do
    if c[4] then
      local b = parse_limit(c[1], c[4])
      b.scope, b.hash, b.field = c[1], c[2], c[3]
      b.shadow = b.shadow or cfg[5] == '1'
      ctx.buckets[#ctx.buckets + 1] = b
      if b.hash == 't' then tfields[#tfields + 1] = b.field else sfields[#sfields + 1] = b.field end
    end
  end

  -- Counters are read here and written back with the bucket state: one write per hash.
  local nt, ns = #tfields, #sfields
  ctx.t_counters = {'n:a', 'n:at'}
  ctx.s_counters = {'n:a', 'n:at'}
  if queue ~= '' then
    ctx.t_counters[3] = 'a:q:' .. queue
    ctx.s_counters[3] = 'a:q:' .. queue
  end
  if priority ~= '' then ctx.s_counters[#ctx.s_counters + 1] = 'a:p:' .. priority end
  tfields[#tfields + 1] = 'x'
  append(tfields, ctx.t_counters)
  append(tfields, t_extra)
  append(sfields, ctx.s_counters)
  local tvals = redis.call('HMGET', tenant_key, unpack(tfields))
  local svals = redis.call('HMGET', shared_key, unpack(sfields))
  ctx.old_x = tonumber(tvals[nt + 1]) or 0
  ctx.t_counter_vals, ctx.s_counter_vals = {}, {}
  for i = 1, #ctx.t_counters do ctx.t_counter_vals[i] = tonumber(tvals[nt + 1 + i]) or 0 end
  for i = 1, #ctx.s_counters do ctx.s_counter_vals[i] = tonumber(svals[ns + i]) or 0 end
  for i = 1, #t_extra do ctx.t_extra[i] = tvals[nt + 1 + #ctx.t_counters + i] end

  -- Refill every bucket to now from its stored state.
  local now = clock_us()
  ctx.now = now
  local ti, si = 0, 0
  for _, b in ipairs(ctx.buckets) do
    local state
    if b.hash == 't' then ti = ti + 1; state = tvals[ti] else si = si + 1; state = svals[si] end
    local tokens, updated = b.burst, now
    if state then
      local tok, upd = string.match(state, '^(%S+) (%S+)$')
      tokens, updated = tonumber(tok) or b.burst, tonumber(upd) or now
    end
    -- A clock that stepped backwards (failover to a replica, NTP) refills nothing.
    local elapsed = math.max(0, now - updated)
    -- min() also clamps a bucket whose burst was lowered; a raised burst grants no windfall.
    b.tokens = math.min(b.burst, tokens + elapsed * b.rate)
  end
  return ctx
end

-- Judge `cost` against the refilled buckets. Returns status (1 allowed, 0 denied, -1 cost
-- can never fit), wait in microseconds, the denying scope (the one that needs longest; for
-- -1 the scope that is too small), and the shadow scopes that would have denied.
local function judge(ctx, cost)
  local allowed, wait, denied_by, would_deny = 1, 0, false, {}
  for _, b in ipairs(ctx.buckets) do
    local short = cost - b.tokens
    b.ok = short <= EPSILON * math.max(1, cost)
    if cost > b.burst + EPSILON and not b.shadow then
      return -1, 0, b.scope, would_deny
    end
    if not b.ok then
      if b.shadow then
        would_deny[#would_deny + 1] = b.scope
      else
        allowed = 0
        local need = short / b.rate
        if need > wait or not denied_by then wait, denied_by = need, b.scope end
      end
    end
  end
  return allowed, wait, denied_by, would_deny
end

local function burst_of(ctx, scope)
  for _, b in ipairs(ctx.buckets) do
    if b.scope == scope then return b.burst end
  end
  return 0
end

local function is_tenant_scope(scope)
  return string.sub(scope, 1, 7) == 'tenant:'
end

local function wait_bucket(wait_ms)
  for _, bound in ipairs(WAIT_BOUNDS) do
    if wait_ms <= bound then return 'h:' .. bound end
  end
  return 'h:inf'
end

-- The tenant hash must outlive every bucket in it (a missing bucket reads as full, so
-- expiring earlier would hand out tokens twice) and keep counters for `keep_ms` after.
-- Refreshes only when more than half the retention is used, to spare a write per call.
local function expiry_fields(ctx, need_ms, keep_ms, targs)
  if need_ms + keep_ms / 2 > ctx.old_x then
    local x = math.ceil(need_ms + keep_ms)
    targs[#targs + 1] = 'x'
    targs[#targs + 1] = x
    ctx.old_x = x
    return x
  end
  return false
end

-- When (ms since the epoch, at least now) every tenant bucket will be full again under the
-- current limits. A limit changed since the last write can move this later, so a denial
-- (which writes no bucket) must extend the hash's life too.
local function tenant_full_ms(ctx)
  local full_ms = ctx.now / 1000
  for _, b in ipairs(ctx.buckets) do
    if b.hash == 't' then
      local full = (ctx.now + (b.burst - b.tokens) / b.rate) / 1000
      if full > full_ms then full_ms = full end
    end
  end
  return full_ms
end

-- Write the buckets (refilled, and debited or credited by the caller), plus `targs` extra
-- tenant-hash fields and `sargs` shared-hash fields, and extend the tenant hash's life.
local function write(ctx, keep_ms, targs, sargs)
  local now = ctx.now
  for _, b in ipairs(ctx.buckets) do
    local value = fmt(b.tokens) .. ' ' .. fmt(now)
    if b.hash == 't' then
      append(targs, {b.field, value})
    else
      append(sargs, {b.field, value})
    end
  end
  local x = expiry_fields(ctx, tenant_full_ms(ctx), keep_ms, targs)
  if #targs > 0 then redis.call('HSET', ctx.tenant_key, unpack(targs)) end
  if x then redis.call('PEXPIREAT', ctx.tenant_key, x) end
  if #sargs > 0 then redis.call('HSET', ctx.shared_key, unpack(sargs)) end
end

-- Admit `cost`: debit every bucket, count the admission and the shadow would-denies.
-- `targs` may carry extra tenant-hash fields to write in the same HSET.
local function admit(ctx, cost, would_deny, keep_ms, targs)
  for _, b in ipairs(ctx.buckets) do
    -- A shadow bucket spends only what it could have granted: it models the enforced
    -- limiter, which would have turned the rest away.
    if b.ok or not b.shadow then b.tokens = b.tokens - cost end
  end
  if #would_deny > 0 then
    redis.call('HINCRBY', ctx.tenant_key, 'n:w', 1)
    redis.call('HINCRBY', ctx.shared_key, 'n:w', 1)
    for _, scope in ipairs(would_deny) do
      local key = is_tenant_scope(scope) and ctx.tenant_key or ctx.shared_key
      redis.call('HINCRBY', key, 'w:' .. scope, 1)
    end
  end
  local sargs = {}
  local increments = {1, cost, 1, 1}
  for i, f in ipairs(ctx.t_counters) do append(targs, {f, fmt(ctx.t_counter_vals[i] + increments[i])}) end
  for i, f in ipairs(ctx.s_counters) do append(sargs, {f, fmt(ctx.s_counter_vals[i] + increments[i])}) end
  write(ctx, keep_ms, targs, sargs)
end

-- Count a denial. Buckets are untouched: a decision is all-or-nothing.
local function deny(ctx, denied_by, wait_ms, keep_ms)
  redis.call('HINCRBY', ctx.tenant_key, 'n:d', 1)
  local key = is_tenant_scope(denied_by) and ctx.tenant_key or ctx.shared_key
  redis.call('HINCRBY', key, 'd:' .. denied_by, 1)
  local targs = {}
  local x = expiry_fields(ctx, tenant_full_ms(ctx), keep_ms, targs)
  if x then
    redis.call('HSET', ctx.tenant_key, unpack(targs))
    redis.call('PEXPIREAT', ctx.tenant_key, x)
  end
  redis.call('HINCRBY', ctx.shared_key, 'n:d', 1)
  redis.call('HINCRBY', ctx.shared_key, wait_bucket(wait_ms), 1)
  redis.call('HINCRBYFLOAT', ctx.shared_key, 'h:sum', wait_ms)
end

-- Put `cost` tokens back in every bucket (never above its burst).
local function credit(ctx, cost, keep_ms)
  for _, b in ipairs(ctx.buckets) do b.tokens = math.min(b.burst, b.tokens + cost) end
  write(ctx, keep_ms, {}, {})
end

local function remaining_list(ctx)
  local out = {}
  for _, b in ipairs(ctx.buckets) do append(out, {b.scope, fmt(math.max(0, b.tokens))}) end
  return out
end
