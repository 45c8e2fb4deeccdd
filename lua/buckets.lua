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
local TWO_53 = 9007199254740992
local format, match = string.format, string.match

-- Redis converts Lua numbers in replies to integers: floats travel as strings.
-- Whole numbers below 2^53 (the clock, counters, whole tokens) print the same digits with
-- %d, which is cheaper than %.17g; zero takes the general path so -0 stays "-0".
local function fmt(n)
  if n % 1 == 0 and n ~= 0 and n < TWO_53 and n > -TWO_53 then
    return format('%d', n)
  end
  return format('%.17g', n)
end

-- Redis's own clock in microseconds; never the caller's, so skewed clients change nothing.
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Returns rate (tokens per microsecond), burst, shadow flag.
local function parse_limit(scope, value)
  local rate, per, burst, flags = match(value, '^(%S+) (%S+) (%S+) (%S+)$')
  rate, per, burst = tonumber(rate), tonumber(per), tonumber(burst)
  if not (rate and per and burst) or rate <= 0 or per <= 0 or burst <= 0 then
    error('queue-ratelimit: corrupt limit for ' .. scope .. ': ' .. value)
  end
  return rate / (per * 1000000), burst, string.find(flags, 's', 1, true) ~= nil
end

local function append(list, values)
  local n = #list
  for i = 1, #values do list[n + i] = values[i] end
end

-- One bucket table, built whole (no rehash as fields are added later).
local function add_bucket(buckets, scope, hash, field, value, all_shadow)
  local rate, burst, shadow = parse_limit(scope, value)
  buckets[#buckets + 1] = {scope = scope, hash = hash, field = field, rate = rate, burst = burst,
                           shadow = shadow or all_shadow, tokens = 0, ok = false}
end

local function load(config_key, tenant_key, shared_key, tenant, queue, priority, cfg_extra, t_extra)
  local s_tenant = 'tenant:' .. tenant
  local fields, s_tq, s_q
  if queue ~= '' then
    s_tq, s_q = s_tenant .. ':queue:' .. queue, 'queue:' .. queue
    fields = {'global', s_tenant, 'tenant:*', 'exempt:' .. tenant, 'mode:shadow', s_q, s_tq,
              'tenant:*:queue:' .. queue}
  else
    fields = {'global', s_tenant, 'tenant:*', 'exempt:' .. tenant, 'mode:shadow'}
  end
  local base = #fields
  for i = 1, #cfg_extra do fields[base + i] = cfg_extra[i] end
  local cfg = redis.call('HMGET', config_key, unpack(fields))
  local buckets = {}
  local ctx = {tenant_key = tenant_key, shared_key = shared_key, queue = queue, priority = priority,
               buckets = buckets, cfg_extra = {}, t_extra = {}, t_counters = false,
               s_counters = false, t_counter_vals = false, s_counter_vals = false, old_x = 0, now = 0}
  local ce = ctx.cfg_extra
  for i = 1, #cfg_extra do ce[i] = cfg[base + i] end

  local exempt = cfg[4] or ''
  local all_shadow = cfg[5] == '1'
  local tfields, sfields = {}, {}
  local v
  if exempt == '' then
    if queue ~= '' then
      v = cfg[7] or cfg[8]
      if v then
        add_bucket(buckets, s_tq, 't', 'bq:' .. queue, v, all_shadow)
        tfields[#tfields + 1] = 'bq:' .. queue
      end
    end
    v = cfg[2] or cfg[3]
    if v then
      add_bucket(buckets, s_tenant, 't', 'b', v, all_shadow)
      tfields[#tfields + 1] = 'b'
    end
  end
  if exempt ~= 'all' then
    if queue ~= '' then
      v = cfg[6]
      if v then
        add_bucket(buckets, s_q, 's', 'b:queue:' .. queue, v, all_shadow)
        sfields[#sfields + 1] = 'b:queue:' .. queue
      end
    end
    v = cfg[1]
    if v then
      add_bucket(buckets, 'global', 's', 'b:global', v, all_shadow)
      sfields[#sfields + 1] = 'b:global'
    end
  end

  -- Counters are read here and written back with the bucket state: one write per hash.
  local nt, ns = #tfields, #sfields
  local tc, sc
  if queue ~= '' then
    local aq = 'a:q:' .. queue
    tc, sc = {'n:a', 'n:at', aq}, {'n:a', 'n:at', aq}
  else
    tc, sc = {'n:a', 'n:at'}, {'n:a', 'n:at'}
  end
  if priority ~= '' then sc[#sc + 1] = 'a:p:' .. priority end
  ctx.t_counters, ctx.s_counters = tc, sc
  tfields[nt + 1] = 'x'
  for i = 1, #tc do tfields[nt + 1 + i] = tc[i] end
  local t_off = nt + 1 + #tc
  for i = 1, #t_extra do tfields[t_off + i] = t_extra[i] end
  for i = 1, #sc do sfields[ns + i] = sc[i] end
  local tvals = redis.call('HMGET', tenant_key, unpack(tfields))
  local svals = redis.call('HMGET', shared_key, unpack(sfields))
  ctx.old_x = tonumber(tvals[nt + 1]) or 0
  local tcv, scv = {}, {}
  for i = 1, #tc do tcv[i] = tonumber(tvals[nt + 1 + i]) or 0 end
  for i = 1, #sc do scv[i] = tonumber(svals[ns + i]) or 0 end
  ctx.t_counter_vals, ctx.s_counter_vals = tcv, scv
  local te = ctx.t_extra
  for i = 1, #t_extra do te[i] = tvals[t_off + i] end

  -- Refill every bucket to now from its stored state.
  local now = clock_us()
  ctx.now = now
  local ti, si = 0, 0
  for i = 1, #buckets do
    local b = buckets[i]
    local state
    if b.hash == 't' then ti = ti + 1; state = tvals[ti] else si = si + 1; state = svals[si] end
    local burst = b.burst
    local tokens, updated = burst, now
    if state then
      local tok, upd = match(state, '^(%S+) (%S+)$')
      tokens, updated = tonumber(tok) or burst, tonumber(upd) or now
    end
    -- A clock that stepped backwards (failover to a replica, NTP) refills nothing.
    -- (Same comparisons as math.max(0, e) and math.min(burst, t), NaN included.)
    local elapsed = now - updated
    if not (elapsed > 0) then elapsed = 0 end
    local refilled = tokens + elapsed * b.rate
    if refilled < burst then b.tokens = refilled else b.tokens = burst end
  end
  return ctx
end

local function judge(ctx, cost)
  local allowed, wait, denied_by, would_deny = 1, 0, false, {}
  local slack = EPSILON * math.max(1, cost)
  local buckets = ctx.buckets
  for i = 1, #buckets do
    local b = buckets[i]
    local short = cost - b.tokens
    b.ok = short <= slack
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

-- When (ms since the epoch, at least now) every tenant bucket will be full again.
local function tenant_full_ms(ctx)
  local now = ctx.now
  local full_ms = now / 1000
  local buckets = ctx.buckets
  for i = 1, #buckets do
    local b = buckets[i]
    if b.hash == 't' then
      local full = (now + (b.burst - b.tokens) / b.rate) / 1000
      if full > full_ms then full_ms = full end
    end
  end
  return full_ms
end

local function write(ctx, keep_ms, targs, sargs)
  local now = ctx.now
  local now_s = ' ' .. fmt(now)
  local full_ms = now / 1000
  local buckets = ctx.buckets
  for i = 1, #buckets do
    local b = buckets[i]
    local value = fmt(b.tokens) .. now_s
    if b.hash == 't' then
      local n = #targs
      targs[n + 1], targs[n + 2] = b.field, value
      local full = (now + (b.burst - b.tokens) / b.rate) / 1000
      if full > full_ms then full_ms = full end
    else
      local n = #sargs
      sargs[n + 1], sargs[n + 2] = b.field, value
    end
  end
  local x = expiry_fields(ctx, full_ms, keep_ms, targs)
  if #targs > 0 then redis.call('HSET', ctx.tenant_key, unpack(targs)) end
  if x then redis.call('PEXPIREAT', ctx.tenant_key, x) end
  if #sargs > 0 then redis.call('HSET', ctx.shared_key, unpack(sargs)) end
end

local function admit(ctx, cost, would_deny, keep_ms, targs)
  local buckets = ctx.buckets
  for i = 1, #buckets do
    local b = buckets[i]
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
  -- Counter increments: n:a +1, n:at +cost, a:q:<q> +1, a:p:<p> +1.
  local sargs = {}
  local names, vals = ctx.t_counters, ctx.t_counter_vals
  local n = #targs
  for i = 1, #names do
    targs[n + 1], targs[n + 2] = names[i], fmt(vals[i] + (i == 2 and cost or 1))
    n = n + 2
  end
  names, vals = ctx.s_counters, ctx.s_counter_vals
  for i = 1, #names do
    sargs[2 * i - 1], sargs[2 * i] = names[i], fmt(vals[i] + (i == 2 and cost or 1))
  end
  write(ctx, keep_ms, targs, sargs)
end

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

local function credit(ctx, cost, keep_ms)
  for _, b in ipairs(ctx.buckets) do b.tokens = math.min(b.burst, b.tokens + cost) end
  write(ctx, keep_ms, {}, {})
end
