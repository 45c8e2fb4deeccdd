-- buckets.lua: token-bucket primitives shared by every script that admits work.
--
-- The Python loader prepends this file to the scripts that consume tokens, so the bucket
-- arithmetic exists once. All state of one decision lives in three hashes, whose keys share
-- the namespace's {hash tag} (one Redis Cluster slot):
--   config  <prefix>:{ns}:config     scope -> "<rate> <per> <burst> <flags>", exempt:<t>, mode:shadow
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
    return redis.error_reply('queue-ratelimit: corrupt limit for ' .. scope .. ': ' .. value)
  end
  return {rate = rate / (per * 1000000), burst = burst, shadow = string.find(flags, 's', 1, true) ~= nil}
end

-- The buckets that apply to (tenant, queue), most specific first, with their limits and the
-- hash fields their state lives in. One HMGET reads every limit that could apply.
-- Returns the bucket list, or an error reply for a corrupt limit.
local function plan_buckets(config_key, tenant, queue)
  local fields = {'global', 'tenant:' .. tenant, 'tenant:*', 'exempt:' .. tenant, 'mode:shadow'}
  if queue ~= '' then
    fields[6] = 'queue:' .. queue
    fields[7] = 'tenant:' .. tenant .. ':queue:' .. queue
    fields[8] = 'tenant:*:queue:' .. queue
  end
  local cfg = redis.call('HMGET', config_key, unpack(fields))
  local exempt = cfg[4] or ''
  local all_shadow = cfg[5] == '1'
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
  local buckets = {}
  for _, c in ipairs(candidates) do
    if c[4] then
      local b = parse_limit(c[1], c[4])
      if b.err then return b end
      b.scope, b.hash, b.field = c[1], c[2], c[3]
      b.shadow = b.shadow or all_shadow
      buckets[#buckets + 1] = b
    end
  end
  return buckets
end

-- Refill every bucket to `now` from its stored state (read with the HMGET results given).
local function refill(buckets, tenant_vals, shared_vals, now)
  local ti, si = 0, 0
  for _, b in ipairs(buckets) do
    local state
    if b.hash == 't' then ti = ti + 1; state = tenant_vals[ti] else si = si + 1; state = shared_vals[si] end
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
end

-- Field lists for the HMGETs that read bucket state, in plan order.
local function state_fields(buckets)
  local tf, sf = {}, {}
  for _, b in ipairs(buckets) do
    if b.hash == 't' then tf[#tf + 1] = b.field else sf[#sf + 1] = b.field end
  end
  return tf, sf
end

-- Judge `cost` against refilled buckets. Returns status (1 allowed, 0 denied, -1 cost can
-- never fit), wait in microseconds, the denying scope (the one that needs longest), and the
-- scopes in shadow mode that would have denied.
local function judge(buckets, cost)
  local allowed, wait, denied_by, would_deny = 1, 0, false, {}
  for _, b in ipairs(buckets) do
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

-- Serialise refilled (and possibly debited) buckets back into HSET argument lists.
-- Returns the latest time (ms) at which any tenant bucket will be full again.
local function write_fields(buckets, now, tenant_args, shared_args)
  local full_ms = 0
  for _, b in ipairs(buckets) do
    local value = fmt(b.tokens) .. ' ' .. fmt(now)
    if b.hash == 't' then
      tenant_args[#tenant_args + 1] = b.field
      tenant_args[#tenant_args + 1] = value
      local full = (now + (b.burst - b.tokens) / b.rate) / 1000
      if full > full_ms then full_ms = full end
    else
      shared_args[#shared_args + 1] = b.field
      shared_args[#shared_args + 1] = value
    end
  end
  return full_ms
end

-- Extend the tenant hash's life so it outlives every bucket in it (a missing bucket reads as
-- full, so expiring earlier would hand out tokens twice) and keeps counters for `keep_ms`.
-- Refreshes only when more than half the retention is used, to spare a write per call.
local function extend_expiry(tenant_key, old_x, need_ms, keep_ms, tenant_args)
  old_x = tonumber(old_x) or 0
  if need_ms + keep_ms / 2 > old_x then
    local x = math.ceil(need_ms + keep_ms)
    tenant_args[#tenant_args + 1] = 'x'
    tenant_args[#tenant_args + 1] = x
    return x
  end
  return false
end

local function wait_bucket(wait_ms)
  for _, bound in ipairs(WAIT_BOUNDS) do
    if wait_ms <= bound then return 'h:' .. bound end
  end
  return 'h:inf'
end

-- Counters and histogram for a denied decision. Buckets are untouched (all-or-nothing).
local function record_denial(tenant_key, shared_key, denied_by, wait_ms, old_x, now_ms, keep_ms)
  redis.call('HINCRBY', tenant_key, 'n:d', 1)
  if string.sub(denied_by, 1, 7) == 'tenant:' then
    redis.call('HINCRBY', tenant_key, 'd:' .. denied_by, 1)
  else
    redis.call('HINCRBY', shared_key, 'd:' .. denied_by, 1)
  end
  local targs = {}
  local x = extend_expiry(tenant_key, old_x, now_ms, keep_ms, targs)
  if x then
    redis.call('HSET', tenant_key, unpack(targs))
    redis.call('PEXPIREAT', tenant_key, x)
  end
  redis.call('HINCRBY', shared_key, 'n:d', 1)
  redis.call('HINCRBY', shared_key, wait_bucket(wait_ms), 1)
  redis.call('HINCRBYFLOAT', shared_key, 'h:sum', wait_ms)
end

-- Shadow-mode scopes that would have denied an admitted decision.
local function record_would_deny(tenant_key, shared_key, would_deny)
  if #would_deny == 0 then return end
  redis.call('HINCRBY', tenant_key, 'n:w', 1)
  redis.call('HINCRBY', shared_key, 'n:w', 1)
  for _, scope in ipairs(would_deny) do
    if string.sub(scope, 1, 7) == 'tenant:' then
      redis.call('HINCRBY', tenant_key, 'w:' .. scope, 1)
    else
      redis.call('HINCRBY', shared_key, 'w:' .. scope, 1)
    end
  end
end

local function remaining_list(buckets)
  local out = {}
  for _, b in ipairs(buckets) do
    out[#out + 1] = b.scope
    out[#out + 1] = fmt(math.max(0, b.tokens))
  end
  return out
end
