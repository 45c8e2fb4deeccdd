-- buckets.lua: token-bucket primitives shared by every script that admits work.
--
-- Loaded in front of the scripts that consume tokens (once per Redis Functions library, or
-- prepended to each script for EVALSHA), so the bucket arithmetic exists once. All state of
-- one decision lives in three hashes, whose keys share the namespace's {hash tag} (one Redis
-- Cluster slot):
--   config  <prefix>:{ns}:config     scope -> "<rate> <per> <burst> <flags>" (windows joined
--                                    by ';', flags 's' shadow and 'c<n>' credit), exempt:<t>,
--                                    mode:shadow, mode:record, weight:*, _version,
--                                    pause:<scope> (see plan_pauses)
--   tenant  <prefix>:{ns}:t:<tenant> b, b:u (tenant bucket), bq:<q>, bq:<q>:u (tenant-queue
--                                    bucket), x (expiry, ms since epoch), n:a (allowed),
--                                    d:<scope> (denied, by any scope), n:w (would deny),
--                                    w:<scope>; expires when idle
--   shared  <prefix>:{ns}:shared     b:global, b:global:u, b:queue:<q>, b:queue:<q>:u,
--                                    b:priority:<p>, b:priority:<p>:u,
--                                    a:q:<q> (allowed per queue, a:q:- without one),
--                                    a:p:<p>, a:q:~ and a:p:~ (names past the first
--                                    512 queues / 64 priorities), n:aq and n:ap (names
--                                    counted apart), n:ax (allowed cost beyond 1 per job),
--                                    h:<ms> (denials by wait), h:us (their total wait),
--                                    n:w, d:<scope> and w:<scope> (denials and
--                                    would-denials by the limit or cap that decided: a
--                                    queue or global scope, or the tenant scope as
--                                    configured, tenant:* for every tenant under the
--                                    default), _rev (the config revision, see below);
--                                    never expires
--   denials <prefix>:{ns}:dt          zset tenant -> its denials (any scope), for the
--                                    metrics' most-throttled tenants: at most
--                                    MAX_TENANT_COUNTERS tenants; past that the least
--                                    denied half is dropped (totals stay exact: they are
--                                    the h:* sums); never expires
-- Concurrency caps (config conc:<scope> = n, the same six scopes as limits; tenant:* and
-- tenant:*:queue:<q> give each tenant a cap of its own): at most n jobs of the scope hold a
-- slot at once. A scope's slots are one sorted set, holder -> lease deadline (Redis time in
-- us); expired holders are reclaimed by the next decision that finds the set full, so the
-- set never holds more than its cap (bounded work), and the key expires MAX_HOLD_MS after
-- its last admission or renewal:
--   slots   <prefix>:{ns}:c:<scope>   zset holder -> deadline (us)
--   waiters <prefix>:{ns}:s2:wake:<scope>  set "<lane> <tenant>" of scheduler lanes where
--                                     the tenant is parked by this cap: woken when a slot
--                                     of the scope is released (the scheduler's key, named
--                                     by the prefixes its callers pass: KeySpace)
-- A decision without caps reads and writes none of this.
-- With recording on (config mode:record = seconds kept), every admission and denial is also
-- counted per second for previews of a configuration change (_preview.py):
--   record  <prefix>:{ns}:rec:<minute> "<tenant> <queue or -> <second 0-59>" -> cost admitted,
--                                      the same field + " d" -> denials; expires when no
--                                      longer within the recording's reach
-- Totals are sums (allowed = sum of a:q:*, denied = sum of h:*, a tenant's denials = sum of
-- its d:*), which saves a counter per decision. As a Functions library, the counters of a
-- decision (every field above but the buckets, x and _rev, and the denials zset) are first
-- added up in the library's memory and written at most a second later (see "Counters kept
-- in memory" below); readers flush them first (counters.lua). A bucket is two numbers in
-- two fields: its tokens (field F, as tokens_text prints them) and the Redis TIME in
-- microseconds they were counted at (field F:u); a bucket with credit has its bank in F:c (with_credit), a scope's further
-- windows their own F:w<seconds> (add_buckets). A missing bucket is a full one, which is
-- why a tenant hash may expire as soon as all its buckets would have refilled.
--
-- Cost: every redis.call, every field it returns, every number parsed or printed and every
-- table built costs thousands of CPU instructions inside Redis (measured with callgrind:
-- docs/benchmarks.md). So a decision reads the configuration once per config revision
-- (below), reads each hash with one HMGET of only the bucket fields, writes each with one
-- HSET, and counts with one HINCRBY per hash.
--
-- Only constants and functions at this level: while Redis loads a Functions library, no
-- global (string, math, ...) may be touched; the functions use them when called.

-- Tolerance for float rounding when comparing tokens with a cost (e.g. 0.1 + 0.2 tokens).
local EPSILON = 1e-9
-- Upper bounds (ms) of the wait-time histogram kept for denied decisions.
local WAIT_BOUNDS = {1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000}
local WAIT_FIELDS = {'h:1', 'h:5', 'h:10', 'h:25', 'h:50', 'h:100', 'h:250', 'h:500', 'h:1000',
                     'h:2500', 'h:5000', 'h:10000', 'h:30000', 'h:60000'}
local TWO_53 = 9007199254740992
-- Shared by every caller that has no extra fields or no would-deny scopes: never written.
local NONE = {}

-- What the configuration decides for a (tenant, queue, priority) — its "plan": the enforced
-- buckets and the fields to read — is kept per config hash and revision. As a Functions
-- library this state lives between calls (as EVALSHA scripts, it starts empty each call), so
-- a decision reads no config field at all and parses no limit. Every configuration change
-- goes through config.lua, which sets `_rev` in the shared hash to a stamp no earlier state
-- had; a decision reads `_rev` with its shared buckets and drops the cache when it moved.
--
-- The cache lives in the Lua VM of Redis Functions, which `maxmemory` does not bound
-- (INFO memory: used_memory_vm_functions), so it is bounded here: by an estimate of its
-- bytes, over every namespace together (one-off tenants in many namespaces add up the same
-- as in one). Past the budget it starts over, and Lua's incremental collector frees what it
-- dropped as it goes (a full collection there and then would stall Redis for milliseconds),
-- so the VM holds at most about twice the budget. A plan is estimated from its shape
-- (measured live: about 1.2 KB, 0.5 KB more per bucket, 0.4 KB per concurrency cap;
-- docs/reliability.md has the figures and the commands).
local CONFIGS, cache_bytes = {}, 0
local CACHE_BYTES = 8 * 1024 * 1024
local PLAN_BYTES, BUCKET_BYTES, CAP_BYTES, CONFIG_BYTES, VALUE_BYTES = 1300, 500, 400, 600, 120
-- A slot set expires this long after its last admission or renewal (no hold is longer:
-- MAX_HOLD in _core.py, MAX_LEASE in _scheduler.py), so a dead worker's slots cost nothing
-- for long once their scope goes quiet.
local MAX_HOLD_MS = 7 * 86400000
-- Slot holders woken per release (parked scheduler tenants waiting for the scope).
local WAKE_BATCH = 64
-- Admissions per queue (a:q:<q>) and per priority (a:p:<p>) are counted in the shared hash,
-- which never expires: past this many names of a kind, a new name counts under a:q:~ or
-- a:p:~ ("other"), so one-off names cannot grow the hash without bound. n:aq and n:ap
-- count the names that have a counter (MAX_QUEUE_COUNTERS in metrics.py).
local MAX_QUEUE_COUNTERS, MAX_PRIORITY_COUNTERS = 512, 64
-- Tenants counted in the denials zset (MAX_TENANT_COUNTERS in metrics.py). Past it, the
-- least denied half goes at once (one ZREMRANGEBYRANK), so a tenant new to the set has
-- the room of half the set's worth of newcomers to climb above the cut, and dropping
-- costs one command per that many new tenants rather than one per denial.
local MAX_TENANT_COUNTERS = 4096
-- The longest wait a decision reports (about ten years, in us; MAX_WAIT in _core.py). Only
-- a huge cost on a very slow bucket waits longer, and a wait that long means "not in this
-- deployment's lifetime" either way; clamped, every wait and every time computed from one
-- (a tenant hash's expiry, a parked tenant's wake-up) stays a whole number well below 2^53,
-- so it prints as an integer Redis accepts (PEXPIREAT refuses "9.9e+21") and adds exactly.
local MAX_WAIT_US = 3650 * 86400000000
-- Bounds of the numbers a caller passes (checked before anything is written, so a call
-- that fails changes nothing; _core.py checks the same before sending): cost, counter
-- retention (ms) and slot hold (ms).
local MIN_COST, MAX_COST = 1e-6, 1e12
-- The most extra admissions one gate call may take ahead (MAX_CREDIT in _scheduler.py).
local MAX_CREDIT = 1000000
local MAX_KEEP_MS = MAX_WAIT_US / 1000
-- The latest a tenant hash's expiry can be (ms after now): its buckets' refill plus the
-- retention, each at most the above.
local MAX_EXPIRY_MS = MAX_WAIT_US / 1000 + MAX_KEEP_MS

-- Redis converts Lua numbers in replies to integers: floats travel as strings.
-- Whole numbers below 2^53 (the clock, counters, whole tokens) print the same digits with
-- %d, which is cheaper than %.17g; zero takes the general path so -0 stays "-0".
local function fmt(n)
  if n % 1 == 0 and n ~= 0 and n < TWO_53 and n > -TWO_53 then
    return string.format('%d', n)
  end
  return string.format('%.17g', n)
end

-- A bucket's tokens as stored and replied, and the number that text reads back as. A
-- fraction printed in full (%.17g) costs about 5,300 CPU instructions inside Redis, an
-- integer (%d) about 2,000 (callgrind: docs/benchmarks.md, "Fractional tokens"). So a
-- positive fraction is rounded *down* to a grid of 1e-9 tokens (1e-6 from 9e6 tokens,
-- 1e-3 from 9e9: the count of steps stays below 9e15, whole and exact in a double) and
-- printed as that count with its exponent, "1500000001e-9". Every reader of a bucket
-- (tonumber and `+ 0` in Lua, float() in Python, this code before the change) reads it as
-- the number it is, correctly rounded: the same double as `count / scale` here. Rounding
-- down never gives a bucket a token it did not have: each write keeps less than 1e-9
-- tokens back (below the 1e-9 tolerance of judge), or less than 1.2e-13 of the tokens in
-- a bucket of more than 9e6; a full bucket forgets it. Whole numbers print as fmt does
-- (a bucket that stays full stores what it always stored), others (zero or below, from
-- the tolerance; 9e12 and beyond, above any valid burst) in full.
local function tokens_text(t)
  if t % 1 == 0 or not (t > 0 and t < 9e12) then return fmt(t), t end
  local scale, form = 1e9, '%de-9'
  if t >= 9e6 then
    if t < 9e9 then scale, form = 1e6, '%de-6' else scale, form = 1e3, '%de-3' end
  end
  local steps = t * scale
  steps = steps - steps % 1  -- (floor: exact for a positive double below 2^53)
  local value = steps / scale
  -- The product may have rounded up to the next whole step: one step down then.
  if value > t then steps = steps - 1; value = steps / scale end
  return string.format(form, steps), value
end

-- A number the caller passed, checked before anything is written: `text` (nil or "" for
-- `default`) must read as a number in [low, high] (NaN never does).
local function arg_number(text, default, low, high, what)
  if text == nil or text == '' then return default end
  local n = tonumber(text)
  if not (n and n >= low and n <= high) then
    error(string.format('queue-ratelimit: %s must be a number in [%g, %g], got %s', what, low,
                        high, string.sub(tostring(text), 1, 40)))
  end
  return n
end

-- The prefix of the namespace's limiter keys, from its config key (`<base>:config`):
-- slot sets are `<prefix>c:<scope>` (KeySpace.slots), recordings `<prefix>rec:<minute>`.
local function ns_prefix(config_key)
  return string.sub(config_key, 1, -7)
end

-- Burst credits (a limit's flags "c<credit>"): while the bucket is full its refill flows on
-- into a bank of at most `credit` tokens, spent after the bucket's own. The bank regrows
-- only while the bucket is full, so bucket and bank together fill at the bucket's rate up
-- to burst + credit and are spent like one bucket of that size: a credit bucket is judged
-- (and waited for, refilled, refunded, expired) as such, b.burst being burst + credit. What
-- is kept apart is the split: the bucket's own tokens in field F (never above its burst,
-- b.bucket), the bank in F:c (b.bank). A stored bucket without F:c has an empty bank; a
-- missing bucket is full, bank included (its hash expires only once both would be full).
local function with_credit(b, text, value)
  local credit = tonumber(text)
  if not (credit and credit >= 0 and credit < 1e15) then
    error('queue-ratelimit: corrupt credit for ' .. b.scope .. ': ' .. value)
  end
  if credit > 0 then
    b.bucket, b.credit, b.bank = b.burst, credit, b.field .. ':c'
    b.burst = b.burst + credit
  end
end

-- Several windows per scope ("100 1 100 -;10000 86400 10000 -", at most MAX_WINDOWS): one
-- bucket each, all judged in the same decision (every window must admit). The (first)
-- shortest window keeps the scope's own fields (a single-window limit is stored as it
-- always was); each other one has fields of its own, named by its period (F:w<seconds>,
-- then F:w<seconds>:2... for more of the same period), so a daily window's state is not
-- mixed up with a per-second one's, whichever order they are given in. When a scope's
-- windows change, config.lua keeps each period's state where it was, marking the place in
-- the window's flags where it is not the default one ("@w86400", "@" for F; default_places).
local MAX_WINDOWS = 4
local PERIOD_UNITS = {[1] = 's', [60] = 'm', [3600] = 'h', [86400] = 'd'}

-- A window as Limit.parse reads it and format_limit (_decision.py) writes it: "10000/d".
local function window_label(rate, per)
  local unit = PERIOD_UNITS[per] or (string.format('%.15g', per) .. 's')
  return string.format('%.15g', rate) .. '/' .. unit
end

-- A bucket of the plan: where it lives and its limit (rate in tokens per microsecond).
-- `src`: the configured scope it follows (its own, or the tenant default: tenant:*), the
-- name its denials are counted under in the shared hash.
local function bucket(scope, src, in_tenant, field, at, value, all_shadow)
  local rate, per, burst, flags = string.match(value, '^(%S+) (%S+) (%S+) (%S+)$')
  rate, per, burst = tonumber(rate), tonumber(per), tonumber(burst)
  if not (rate and per and burst) or rate <= 0 or per <= 0 or burst <= 0 then
    error('queue-ratelimit: corrupt limit for ' .. scope .. ': ' .. value)
  end
  local b = {scope = scope, name = scope, src = src, in_tenant = in_tenant, field = field,
             clock = field .. ':u', at = at, rate = rate / (per * 1000000), burst = burst,
             shadow = all_shadow or string.find(flags, 's', 1, true) ~= nil, per = per,
             limit_rate = rate}
  local credit = string.match(flags, 'c(.+)$')
  if credit then with_credit(b, credit, value) end
  return b
end

-- Appends bucket `b` to a plan's `buckets`, and the fields to read for it to `fields` (its
-- tokens, clock, and the bank of a credit bucket: b.at is where they start).
local function push_bucket(buckets, fields, b)
  buckets[#buckets + 1] = b
  local n = #fields
  fields[n + 1], fields[n + 2] = b.field, b.clock
  if b.bank then fields[n + 3] = b.bank end
end

-- Where the state of each window of `ws` ({per = seconds}, as listed) is by default: a field
-- suffix, '' for the scope's own field (the first shortest window), else w<seconds> (then
-- w<seconds>:2... for more of one period). config.lua may mark other places (see below).
local function default_places(ws)
  local shortest = false
  for _, w in ipairs(ws) do
    if not shortest or w.per < shortest then shortest = w.per end
  end
  local seen, out = {}, {}
  for i, w in ipairs(ws) do
    local n = (seen[w.per] or 0) + 1
    seen[w.per] = n
    if w.per == shortest and n == 1 then
      out[i] = ''
    else
      out[i] = 'w' .. fmt(w.per) .. (n > 1 and ':' .. n or '')
    end
  end
  return out
end

-- The field of a window whose flags may mark its place ("-@w86400c50": config.lua keeps a
-- window's state where it was when a limit's windows change), else `default`'s.
local function placed(field, flags, default)
  local place = string.match(flags, '@([^c]*)') or default
  return place == '' and field or field .. ':' .. place
end

-- The buckets of one scope's limit `value` (one per window, see MAX_WINDOWS), pushed onto
-- the plan's `buckets` and `fields`. A window's bucket is named in replies after its scope
-- (the first shortest window) or "<scope>(<window>)"; it counts denials under its scope.
local function add_buckets(buckets, fields, scope, src, in_tenant, field, value, all_shadow)
  if not string.find(value, ';', 1, true) then
    local f = field
    if string.find(value, '@', 1, true) then f = placed(field, value, '') end
    push_bucket(buckets, fields, bucket(scope, src, in_tenant, f, #fields + 1, value, all_shadow))
    return
  end
  local ws = {}
  for w in string.gmatch(value, '[^;]+') do
    local per = tonumber(string.match(w, '^%S+ (%S+) '))
    if not per or #ws >= MAX_WINDOWS then
      error('queue-ratelimit: corrupt limit for ' .. scope .. ': ' .. value)
    end
    ws[#ws + 1] = {per = per, text = w}
  end
  local defaults = default_places(ws)
  for i, w in ipairs(ws) do
    local b = bucket(scope, src, in_tenant, placed(field, w.text, defaults[i]), #fields + 1,
                     w.text, all_shadow)
    b.window = window_label(b.limit_rate, w.per)
    if defaults[i] ~= '' then b.name = scope .. '(' .. b.window .. ')' end
    push_bucket(buckets, fields, b)
  end
end

-- Counts `bytes` more against the cache's budget (for an entry of `c`, the config cache
-- being filled). Past the budget every cache starts over (`c` kept, empty).
local function charge(c, bytes)
  if cache_bytes + bytes > CACHE_BYTES then
    CONFIGS = {[c.key] = c}
    c.plans, c.values, c.bytes, cache_bytes = {}, {}, c.base, c.base
  end
  c.bytes = c.bytes + bytes
  cache_bytes = cache_bytes + bytes
end

-- The cache of one config hash, emptied when the revision it was built at is no longer
-- current (`rev`: the shared hash's `_rev`, or false before any change was made).
local function config_at(config_key, rev)
  local c = CONFIGS[config_key]
  if c and c.rev == rev then return c end
  if c then
    -- Dropped with its plans (their bytes no longer count).
    cache_bytes = cache_bytes - c.bytes
  end
  -- (Its own bytes count from now on; the budget is checked when an entry is added.)
  local base = CONFIG_BYTES + #config_key
  c = {key = config_key, rev = rev, plans = {}, values = {}, base = base, bytes = base}
  CONFIGS[config_key] = c
  cache_bytes = cache_bytes + base
  return c
end

-- A decision (acquire.lua) names two keys, the tenant hash and the shared hash: the config
-- hash and the tenant are read from their names (_keys.py: `<base>:shared`,
-- `<base>:config`, `<base>:t:<tenant>`, one hash tag, so one slot on a cluster). Every key
-- and argument of a call costs Redis about 1,300 instructions to parse and hand to Lua
-- (2-3% of a lean decision), and these two only repeated what the other keys say
-- (docs/benchmarks.md, "Two keys, no tenant argument").
-- The config hash is kept by shared hash (at most CONFIG_KEYS_MAX; past that the memo
-- starts over), so that a call pays a table read rather than string work; the tenant is
-- read from the name only to build a plan (plans are cached by tenant hash: cached_plan).
local CONFIG_KEYS_MAX = 4096
local config_keys, config_keys_n = {}, 0

-- The config hash of a shared hash, by its name.
local function config_key_of(shared_key)
  local config_key = config_keys[shared_key]
  if config_key then return config_key end
  if string.sub(shared_key, -7) ~= ':shared' then
    error('queue-ratelimit: not a shared hash: ' .. string.sub(shared_key, 1, 200))
  end
  config_key = string.sub(shared_key, 1, -7) .. 'config'
  if config_keys_n >= CONFIG_KEYS_MAX then config_keys, config_keys_n = {}, 0 end
  config_keys[shared_key], config_keys_n = config_key, config_keys_n + 1
  return config_key
end

-- The tenant a tenant hash belongs to, by its name; an error unless that hash is in the
-- shared hash's namespace (its name: the shared hash's base, ':t:', the tenant).
local function tenant_of(tenant_key, shared_key)
  local base_len = #shared_key - 7
  if #tenant_key <= base_len + 3 or
      string.sub(tenant_key, 1, base_len + 3) ~= string.sub(shared_key, 1, base_len) .. ':t:' then
    error('queue-ratelimit: not a tenant hash of this namespace: ' ..
          string.sub(tenant_key, 1, 200))
  end
  return string.sub(tenant_key, base_len + 4)
end

-- Priority scopes (config priority:<p>): one bucket per priority, across every tenant and
-- queue, kept in the shared hash (b:priority:<p>, b:priority:<p>:u). It caps what work of
-- that priority may take, whatever its weight in the fair scheduler; exempt "all" tenants
-- skip it, as they skip queue and global limits. Appended to the plan's buckets (before
-- global: narrowest first) when the config has one.
local function add_priority_bucket(config_key, priority, buckets, sf, all_shadow)
  if priority == '' then return end
  local scope = 'priority:' .. priority
  local v = redis.call('HGET', config_key, scope)
  if not v then return end
  -- (Through add_buckets: a priority's limit may have several windows and burst credits.)
  add_buckets(buckets, sf, scope, scope, false, 'b:' .. scope, v, all_shadow)
end

-- Pauses (config pause:<scope> = Redis time in ms until which nothing of the scope is
-- admitted; set by config.lua "pause", on Redis's clock). A plan keeps the pauses of its
-- scopes, read once per config revision like everything else it holds: a decision pays
-- nothing for them unless one is set. A pause that ran out stays in the plan until the
-- next revision and is simply past (judge_pauses compares it with now): it expires on its
-- own. Pauses apply whatever the exemptions and the shadow mode: they are an operator's
-- (or a task's) explicit word that the downstream accepts nothing now.
local function plan_pauses(config_key, tenant, queue, priority)
  local scopes = {'tenant:' .. tenant, 'global'}
  if queue ~= '' then
    scopes[3], scopes[4] = 'tenant:' .. tenant .. ':queue:' .. queue, 'queue:' .. queue
  end
  if priority ~= '' then scopes[#scopes + 1] = 'priority:' .. priority end
  local fields = {}
  for i = 1, #scopes do fields[i] = 'pause:' .. scopes[i] end
  local got = redis.call('HMGET', config_key, unpack(fields))
  local pauses = false
  for i = 1, #scopes do
    local untl = tonumber(got[i])
    if untl then
      if not pauses then pauses = {} end
      -- A tenant's pauses count in the shared hash under one name (bounded names, as
      -- tenant:* does for limits); the others under their own.
      local src = 'pause:' .. scopes[i]
      if i == 1 or i == 3 then src = 'pause:tenant:*' .. (i == 3 and ':queue:' .. queue or '') end
      pauses[#pauses + 1] = {scope = scopes[i], src = src, untl = untl * 1000}
    end
  end
  return pauses
end

local function build_plan(config_key, tenant, queue, priority)
  local s_tenant = 'tenant:' .. tenant
  local has_queue = queue ~= ''
  local s_q, s_tq, cfg
  -- Limits, exemption and modes, then the concurrency caps: (scope, own field, default
  -- field) narrowest first, whose values follow at cap_at.
  local cap_scopes, cap_at
  if has_queue then
    s_q, s_tq = 'queue:' .. queue, s_tenant .. ':queue:' .. queue
    cfg = redis.call('HMGET', config_key, 'global', s_tenant, 'tenant:*', 'exempt:' .. tenant,
                     'mode:shadow', 'mode:record', s_q, s_tq, 'tenant:*:queue:' .. queue,
                     'conc:' .. s_tq, 'conc:tenant:*:queue:' .. queue, 'conc:' .. s_tenant,
                     'conc:tenant:*', 'conc:' .. s_q, 'conc:global')
    cap_scopes, cap_at = {s_tq, true, s_tenant, true, s_q, false, 'global', false}, 10
  else
    cfg = redis.call('HMGET', config_key, 'global', s_tenant, 'tenant:*', 'exempt:' .. tenant,
                     'mode:shadow', 'mode:record', 'conc:' .. s_tenant, 'conc:tenant:*',
                     'conc:global')
    cap_scopes, cap_at = {s_tenant, true, 'global', false}, 7
  end
  -- Enforced buckets, narrowest first (the order of `remaining` in a reply), and the
  -- fields to read: each bucket's tokens and clock; the tenant hash's expiry last.
  local exempt = cfg[4] or ''
  local all_shadow = cfg[5] == '1'
  local buckets, tf, sf = {}, {}, {}
  local v
  if exempt == '' then
    if has_queue then
      v = cfg[8] or cfg[9]
      if v then
        local src = cfg[8] and s_tq or 'tenant:*:queue:' .. queue
        add_buckets(buckets, tf, s_tq, src, true, 'bq:' .. queue, v, all_shadow)
      end
    end
    v = cfg[2] or cfg[3]
    if v then
      local src = cfg[2] and s_tenant or 'tenant:*'
      add_buckets(buckets, tf, s_tenant, src, true, 'b', v, all_shadow)
    end
  end
  if exempt ~= 'all' then
    if has_queue then
      v = cfg[7]
      if v then add_buckets(buckets, sf, s_q, s_q, false, 'b:' .. s_q, v, all_shadow) end
    end
    add_priority_bucket(config_key, priority, buckets, sf, all_shadow)
    v = cfg[1]
    if v then add_buckets(buckets, sf, 'global', 'global', false, 'b:global', v, all_shadow) end
  end
  -- Concurrency caps, under the same exemptions as the buckets (a tenant scope's own cap
  -- wins over the tenant default, as with limits).
  local caps, at = {}, cap_at
  local prefix = ns_prefix(config_key)
  for i = 1, #cap_scopes, 2 do
    local scope, of_tenant = cap_scopes[i], cap_scopes[i + 1]
    local src = scope
    if of_tenant then
      v = cfg[at] or cfg[at + 1]
      -- (A tenant default's name: tenant:* or tenant:*:queue:<q>.)
      if not cfg[at] then src = 'tenant:*' .. string.sub(scope, #s_tenant + 1) end
      at = at + 2
    else
      v = cfg[at]
      at = at + 1
    end
    if v and (of_tenant and exempt == '' or not of_tenant and exempt ~= 'all') then
      local n = tonumber(v)
      if not n or n < 1 or n % 1 ~= 0 then
        error('queue-ratelimit: corrupt concurrency cap for ' .. scope .. ': ' .. v)
      end
      caps[#caps + 1] = {scope = scope, src = src, n = n, key = prefix .. 'c:' .. scope,
                         shadow = all_shadow}
    end
  end
  tf[#tf + 1] = 'x'
  sf[#sf + 1] = '_rev'
  -- The longest a tenant bucket takes to refill from empty (at most the longest wait).
  local refill_ms = 0
  for _, b in ipairs(buckets) do
    if b.in_tenant and b.burst / b.rate / 1000 > refill_ms then refill_ms = b.burst / b.rate / 1000 end
  end
  if refill_ms > MAX_WAIT_US / 1000 then refill_ms = MAX_WAIT_US / 1000 end
  local record = false
  if cfg[6] then
    -- Where this plan's traffic is recorded: the minute's hash, and the field less its second.
    local kept = tonumber(cfg[6])
    if not (kept and kept > 0 and kept <= MAX_KEEP_MS / 1000) then
      error('queue-ratelimit: corrupt mode:record: ' .. cfg[6])
    end
    record = {key = ns_prefix(config_key) .. 'rec:', field = tenant .. ' ' ..
              (has_queue and queue or '-') .. ' ', keep_ms = math.ceil(kept) * 1000 + 60000}
  end
  local credit = false
  for _, b in ipairs(buckets) do credit = credit or b.bank ~= nil end
  return {tenant = tenant, denials = prefix .. 'dt', credit = credit,
          buckets = buckets, tf = tf, sf = sf, x_at = #tf, rev_at = #sf, refill_ms = refill_ms,
          aq = has_queue and 'a:q:' .. queue or 'a:q:-',
          ap = priority ~= '' and 'a:p:' .. priority or false, record = record,
          caps = #caps > 0 and caps or false}
end

-- Plans are cached by tenant hash (one per tenant in a namespace), so that the decision's
-- lean path finds its plan from KEYS alone (acquire.lua takes no tenant argument).
local function cached_plan(c, tenant_key, queue, priority)
  local by_tenant = c.plans[tenant_key]
  local by_queue = by_tenant and by_tenant[queue]
  return by_queue and by_queue[priority]
end

-- The priorities weighted by default (scheduler.lua's DEFAULT_PRIORITY_WEIGHTS).
local DEFAULT_PRIORITIES = {high = true, normal = true, low = true}

-- The priority a job of `priority` is judged and queued under: its own when it is weighted
-- by default, or has a weight, a limit or a pause of its own; else 'normal'. The same rule
-- for a decision (its priority scope and pauses: new_plan) and for the fair backlog
-- (scheduler.lua, known_priority), so that a name nobody configured (say `bulk`) is held
-- back by priority:normal at the gate as it is once parked. ('': no priority.)
local function priority_as(config_key, priority)
  if priority == '' or DEFAULT_PRIORITIES[priority] then return priority end
  local scope = 'priority:' .. priority
  local v = redis.call('HMGET', config_key, 'weight:' .. scope, scope, 'pause:' .. scope)
  if v[1] or v[2] or v[3] then return priority end
  return 'normal'
end

local function new_plan(c, config_key, tenant_key, tenant, queue, priority)
  -- (Cached under the priority asked for; built for the one it is judged under.)
  local judged = priority_as(config_key, priority)
  local plan = build_plan(config_key, tenant, queue, judged)
  plan.pauses = plan_pauses(config_key, tenant, queue, judged)
  -- Its estimated size (names appear in several strings of the plan, hence twice; the
  -- tenant hash's name is the cache's key).
  local bytes = PLAN_BYTES + BUCKET_BYTES * #plan.buckets + 2 * (#tenant + #queue + #priority) +
                #tenant_key
  if plan.caps then bytes = bytes + CAP_BYTES * #plan.caps end
  charge(c, bytes)  -- (may start over: the plan is added to what is left)
  local by_tenant = c.plans[tenant_key]
  if not by_tenant then by_tenant = {}; c.plans[tenant_key] = by_tenant end
  local by_queue = by_tenant[queue]
  if not by_queue then by_queue = {}; by_tenant[queue] = by_queue end
  by_queue[priority] = plan
  return plan
end

-- Values of more config fields (weights), cached like the plans (and in the same budget).
local function config_values(c, config_key, names)
  local values, out, missing = c.values, {}, false
  for i = 1, #names do
    local v = values[names[i]]
    if v == nil then missing = true else out[i] = v end
  end
  if missing then
    local got = redis.call('HMGET', config_key, unpack(names))
    local bytes = 0
    for i = 1, #names do bytes = bytes + VALUE_BYTES + #names[i] end
    charge(c, bytes)  -- (may start over: the values go into what is left)
    values = c.values
    for i = 1, #names do
      values[names[i]] = got[i]
      out[i] = got[i]
    end
  end
  return out
end

-- The bank of each credit bucket (by index) as of now: `tokens` (its tokens and bank together,
-- refilled) less the bucket's own. Refill goes to the bucket first, so the bank is what
-- was stored, or more once the bucket is full; never above the credit.
local function banked(buckets, tokens, tv, sv)
  local out = {}
  for i = 1, #buckets do
    local b = buckets[i]
    if b.bank then
      local vals = b.in_tenant and tv or sv
      local c = vals[b.at] and vals[b.at + 1] and vals[b.at + 2] or 0
      c = c + 0
      if tokens[i] - b.bucket > c then c = tokens[i] - b.bucket end
      if c > b.credit then c = b.credit end
      out[i] = c
    end
  end
  return out
end

-- Reads the bucket states of one decision (one HMGET per hash, and TIME) and refills every
-- bucket to now. `cfg_extra` names more config fields to read (ctx.cfg_extra: their values).
-- `tenant` false: read from the tenant hash's name, if a plan must be built (tenant_of).
local function load(config_key, tenant_key, shared_key, tenant, queue, priority, cfg_extra)
  -- The plan cached for the revision last seen; its shared-hash read says whether the
  -- revision is still current. If not (or nothing is cached), plan again.
  local c = CONFIGS[config_key]
  local plan = c and cached_plan(c, tenant_key, queue, priority)
  local sv
  if plan then
    if plan.rev_at == 1 then
      -- No shared bucket: HGET of the revision alone (cheaper than a one-field HMGET).
      if redis.call('HGET', shared_key, '_rev') ~= c.rev then plan = nil end
      sv = NONE
    else
      sv = redis.call('HMGET', shared_key, unpack(plan.sf))
      if sv[plan.rev_at] ~= c.rev then plan = nil end
    end
  end
  if not plan then
    c = config_at(config_key, redis.call('HGET', shared_key, '_rev'))
    plan = new_plan(c, config_key, tenant_key, tenant or tenant_of(tenant_key, shared_key), queue,
                    priority)
    sv = redis.call('HMGET', shared_key, unpack(plan.sf))
  end
  local tv = redis.call('HMGET', tenant_key, unpack(plan.tf))
  -- Redis's own clock (us): never the caller's, so skewed clients change nothing. Its text
  -- (seconds, then microseconds padded to six digits) is what write() stores.
  local time = redis.call('TIME')
  local usec = time[2]
  if #usec < 6 then usec = string.rep('0', 6 - #usec) .. usec end
  local now_s = time[1] .. usec
  -- (Numbers read as `text + 0`: Lua's own coercion, half the cost of a tonumber call.
  -- Only this package writes these fields, and only numbers.)
  local now = now_s + 0
  local buckets = plan.buckets
  local tokens = {}
  for i = 1, #buckets do
    local b = buckets[i]
    local vals = b.in_tenant and tv or sv
    local have, updated = vals[b.at], vals[b.at + 1]
    local t = b.burst
    if have and updated then
      have, updated = have + 0, updated + 0
      -- (A credit bucket: tokens and bank refill as one, see with_credit.)
      if b.bank and vals[b.at + 2] then have = have + vals[b.at + 2] end
      -- A clock that stepped backwards (failover to a replica, NTP) refills nothing.
      local elapsed = now - updated
      if not (elapsed > 0) then elapsed = 0 end
      local refilled = have + elapsed * b.rate
      if refilled < t then t = refilled end
    end
    tokens[i] = t
  end
  -- (ctx.ok is added only by judge with shadow buckets; texts by write.)
  local ctx = {tenant_key = tenant_key, shared_key = shared_key, buckets = buckets,
               tokens = tokens, now = now, now_s = now_s, old_x = (tv[plan.x_at] or 0) + 0,
               plan = plan, texts = false, rev = c.rev}
  if cfg_extra then ctx.cfg_extra = config_values(c, config_key, cfg_extra) end
  if plan.credit then ctx.banked = banked(buckets, tokens, tv, sv) end
  return ctx
end

-- Silences. A lease (an in-flight item's: scheduler.lua; a concurrency slot's: below) runs
-- out when its holder stops renewing it, and what it held is taken back: its holder is
-- taken to be dead. But no holder can renew while Redis itself cannot be reached (stopped,
-- paused, cut off from every worker): leases that run out then are live holders', and
-- taking them back runs their work twice (or lets more jobs hold a cap's slots than the
-- cap). So each call that renews, settles or takes back leases or slots notes Redis's
-- time in the shared hash (field s:seen: "<seen ms> <lease ms> <from ms> <until ms>"), and
-- one that finds none came for more than SILENCE of a lease has found a silence: from the
-- last call noted to now, nobody reached Redis (or nobody called). Half a lease: holders
-- renew every third of one, so a live holder's renewals alone leave no such gap (with room
-- for a late timer; a lower bound would find silences between the renewals of a lone
-- worker, and keep a dead one's leases for as long as that goes on), and a holder that
-- renews as soon as Redis answers loses its lease only to an outage of two thirds of one,
-- which is found. A shorter outage (undetected) costs no live holder its lease if it is
-- back within a sixth of a lease of Redis answering (the worst case: the outage began as
-- it renewed): the Celery gate probes at least that often, RQ's calls wait for Redis.
-- A silence opens a grace window: until one lease after it ended (`until`), only deadlines
-- up to its start (`from`) may be taken back. Leases that ran out earlier, while Redis was
-- being called, belonged to dead holders and go as before; those that ran out in the
-- silence, or run out within the grace (holders that could not renew in the silence, and
-- may need a moment once it ends), are left to their holders to renew or settle until
-- `until`. One HGET (and now and then an HSET) per call, whatever is in flight. A silence found while
-- a window is open (Redis stopped again before the holders were back) keeps its `from` and
-- moves `until`: a dead holder's lease is taken back at most one lease after the last of
-- such silences ended, one lease later than without them. The lease is the one the last
-- call that gave one used (dispatch, extend: a namespace's callers are expected to share
-- one: with two, the shorter finds silences and the longer sets the grace); `fallback_ms`
-- until one is known.
local SILENCE, NOTE_STEP = 0.5, 1 / 16
local DEFAULT_LEASE_MS = 60000
-- The last note text parsed and its numbers (seen, lease, from, until; false for a part
-- that is not a number). Busy callers rewrite the note only every NOTE_STEP of a silence,
-- so most calls read the text the call before them read: a Functions library (whose memory
-- outlives a call) then compares one string (Lua strings are interned: the HGET reply is
-- the very string kept here when the texts are equal) instead of matching four parts and
-- reading four numbers, about 9,000 instructions of the note's 20,000. The numbers are the
-- text's alone, so one memo serves every namespace and database. (In the EVALSHA form the
-- memo is new for each call: every call parses.)
local NOTE = {text = false}

-- Notes this call at Redis time `now` (ms) and returns the latest deadline (ms) that may
-- be taken back now, and the end of the grace window (ms; false when none is open).
-- `lease_ms`: the lease this call gives (nil: none).
local function lease_horizon(shared_key, now, lease_ms, fallback_ms)
  local seen, known, from, untl = false, false, 0, 0
  local rec = redis.call('HGET', shared_key, 's:seen')
  if rec then
    if rec == NOTE.text then
      seen, known, from, untl = NOTE.seen, NOTE.known, NOTE.from, NOTE.untl
    else
      seen, known, from, untl = string.match(rec, '^(%S+) (%S+) (%S+) (%S+)$')
      seen, known = tonumber(seen) or false, tonumber(known) or false
      from, untl = tonumber(from) or 0, tonumber(untl) or 0
      NOTE.text, NOTE.seen, NOTE.known, NOTE.from, NOTE.untl = rec, seen, known, from, untl
    end
  end
  local lease = lease_ms or known or fallback_ms or DEFAULT_LEASE_MS
  -- (Callers with different leases, e.g. Celery's 30 s and RQ's 60 s: the shorter of this
  -- call's and the last one's decides a silence, the longer the grace.)
  local other = known or lease
  local short, long = lease, lease  -- (math.min and math.max of (lease, other), inline)
  if other < lease then short = other elseif other > lease then long = other end
  local silence = short * SILENCE
  if seen then
    local gap = now - seen
    if gap > silence then
      -- (A window still open when the silence began keeps its start: merged.)
      if untl < seen then from = seen end
      untl = math.floor(now + long)
    -- Busy callers write the note at most every NOTE_STEP of a silence: the note runs that
    -- much behind at most, which finds a silence that little sooner.
    elseif gap >= 0 and gap < silence * NOTE_STEP and lease == known then
      if now < untl then return from, untl end
      return now, false
    end
  end
  redis.call('HSET', shared_key, 's:seen',
    string.format('%d %d %d %d', math.floor(now), math.floor(lease), from, untl))
  if now < untl then return from, untl end
  return now, false
end

-- Concurrency caps of a decision whose plan has any: a slot is free when fewer holders
-- than the cap hold one. A full set is first rid of holders whose deadline passed (their
-- worker died or never released): at most the cap's worth, since a set is added to only
-- while below its cap. A full cap's wait is the time to its earliest deadline (a release
-- may come sooner). ctx.free records which caps had a slot, for take_slots; ctx.by_cap
-- whether the scope that denied is a cap (ctx.src: as in judge).
local function judge_caps(ctx, allowed, wait, denied_by, would_deny)
  local caps, now, by_cap, free = ctx.plan.caps, ctx.now, false, {}
  for i = 1, #caps do
    local c = caps[i]
    local running, first, grace = redis.call('ZCARD', c.key), nil, false
    if running >= c.n then
      first = redis.call('ZRANGE', c.key, 0, 0, 'WITHSCORES')
      if first[2] and first[2] + 0 <= now then
        -- Holders whose deadline passed are taken back, but not those whose lease ran
        -- out in a silence (lease_horizon): they count until its grace ends.
        local horizon, untl = lease_horizon(ctx.shared_key, now / 1000)
        local gone = redis.call('ZREMRANGEBYSCORE', c.key, '-inf', untl and horizon * 1000 or now)
        if gone > 0 then
          running = running - gone
          first = redis.call('ZRANGE', c.key, 0, 0, 'WITHSCORES')
        end
        grace = untl and untl * 1000
      end
    end
    local ok = running < c.n
    free[i] = ok
    if not ok then
      if c.shadow then
        if would_deny == NONE then would_deny, ctx.would_src = {}, {} end
        would_deny[#would_deny + 1] = c.scope
        ctx.would_src[#would_deny] = c.src
      else
        allowed = 0
        -- (A holder in a silence's grace still counts: its slot is due when the grace ends.)
        local need = first[2] - now
        if need <= 0 and grace then need = grace - now end
        if need > MAX_WAIT_US then need = MAX_WAIT_US end
        if need > wait or not denied_by then
          wait, denied_by, by_cap, ctx.src = need, c.scope, true, c.src
        end
      end
    end
  end
  ctx.free, ctx.by_cap = free, by_cap
  return allowed == 1 and 2 or allowed, wait, denied_by, would_deny
end

-- Pauses of a decision whose plan has any: a pause still running denies, its wait the
-- time left of it (the longest wait names the scope that denied, as with buckets);
-- ctx.paused says the scope that denied is a pause (ctx.src: its name in the shared hash).
local function judge_pauses(ctx, allowed, wait, denied_by, would_deny)
  local pauses, now = ctx.plan.pauses, ctx.now
  for i = 1, #pauses do
    local p = pauses[i]
    local left = p.untl - now
    if left > 0 then
      if left > MAX_WAIT_US then left = MAX_WAIT_US end
      allowed = 0
      if left > wait or not denied_by then
        wait, denied_by, ctx.src, ctx.paused, ctx.by_cap = left, p.scope, p.src, true, false
      end
    end
  end
  return allowed, wait, denied_by, would_deny
end

-- Returns status (1 allowed, 2 allowed where concurrency caps apply: take_slots then,
-- 0 denied, -1 cost above an enforced burst), the wait in microseconds (at most
-- MAX_WAIT_US), the scope that denied (longest wait) and the shadow scopes that would have
-- (ctx.by_cap: true when that scope is a concurrency cap). ctx.src and ctx.would_src name
-- the configured scopes behind them (a bucket's src), for the shared counters.
local function judge(ctx, cost)
  local allowed, wait, denied_by, would_deny, src = 1, 0, false, NONE, false
  local slack = cost > 1 and EPSILON * cost or EPSILON
  local buckets, tokens = ctx.buckets, ctx.tokens
  for i = 1, #buckets do
    local b = buckets[i]
    local short = cost - tokens[i]
    local fits = short <= slack
    if not b.shadow then
      if cost > b.burst + EPSILON then
        ctx.bound = b  -- (burst_of: which of a scope's windows)
        return -1, 0, b.scope, would_deny
      end
      if not fits then
        allowed = 0
        local need = short / b.rate
        if need > MAX_WAIT_US then need = MAX_WAIT_US end
        if need > wait or not denied_by then
          wait, denied_by, src = need, b.scope, b.src
          ctx.bound = b
        end
      end
    else
      -- Whether a shadow bucket had the tokens (admit charges it only then); enforced
      -- buckets need no such record, so most decisions build no table for it.
      local ok = ctx.ok
      if not ok then ok = {}; ctx.ok = ok end
      ok[i] = fits
      if not fits then
        if would_deny == NONE then would_deny, ctx.would_src = {}, {} end
        would_deny[#would_deny + 1] = b.scope
        ctx.would_src[#would_deny] = b.src
      end
    end
  end
  ctx.src = src
  local pauses = ctx.plan.pauses
  if ctx.plan.caps then
    if not pauses then return judge_caps(ctx, allowed, wait, denied_by, would_deny) end
    allowed, wait, denied_by, would_deny = judge_caps(ctx, allowed, wait, denied_by, would_deny)
  end
  if pauses then return judge_pauses(ctx, allowed, wait, denied_by, would_deny) end
  return allowed, wait, denied_by, would_deny
end

local function burst_of(ctx, scope)
  local bound = ctx.bound
  if bound and bound.scope == scope then return bound.burst end
  for _, b in ipairs(ctx.buckets) do
    if b.scope == scope then return b.burst end
  end
  return 0
end

local function is_tenant_scope(scope)
  return string.sub(scope, 1, 7) == 'tenant:'
end

-- The histogram field of a wait: that of the first bound it does not exceed (a binary
-- search: throttled tenants wait long, past every bound).
local function wait_bucket(wait_ms)
  local low, high = 1, #WAIT_BOUNDS
  if not (wait_ms <= WAIT_BOUNDS[high]) then return 'h:inf' end
  while low < high do
    local mid = math.floor((low + high) / 2)
    if wait_ms <= WAIT_BOUNDS[mid] then high = mid else low = mid + 1 end
  end
  return WAIT_FIELDS[low]
end

-- When (ms since the epoch, at least now, at most MAX_WAIT_US from now) every tenant
-- bucket will be full again.
local function tenant_full_ms(ctx)
  local now, buckets, tokens = ctx.now, ctx.buckets, ctx.tokens
  local need = 0
  for i = 1, #buckets do
    local b = buckets[i]
    if b.in_tenant then
      local refill = (b.burst - tokens[i]) / b.rate
      if refill > need then need = refill end
    end
  end
  if need > MAX_WAIT_US then need = MAX_WAIT_US end
  return (now + need) / 1000
end

-- Pushes a later expiry of the tenant hash onto `targs` when the one it has is too close:
-- when its buckets are full again, plus the counter retention. Moving it only when half
-- the retention is used up keeps the PEXPIREAT off most decisions.
local function expiry_fields(ctx, keep_ms, targs)
  local now_ms, old_x = ctx.now / 1000, ctx.old_x
  -- (An expiry later than any this code sets was never applied: older versions stored one
  -- that PEXPIREAT then refused. It is set again.)
  local sane = old_x <= now_ms + MAX_EXPIRY_MS
  -- Most decisions stop here: even from empty, the buckets refill long before the expiry.
  if sane and now_ms + ctx.plan.refill_ms + keep_ms / 2 <= old_x then return false end
  local need_ms = tenant_full_ms(ctx)
  if need_ms + keep_ms / 2 > old_x or not sane then
    local x = math.ceil(need_ms + keep_ms)
    targs[#targs + 1] = 'x'
    targs[#targs + 1] = fmt(x)
    ctx.old_x = x
    return x
  end
  return false
end

-- A credit bucket's tokens (ctx.tokens[i]: its own and its bank's together) split back into
-- the two as stored: spending takes the bucket's own first and refunds refill them first,
-- so the bank is what it was at load (ctx.banked) unless the bucket's own ran out. Returns
-- both as text, and sets texts[i] to the reply's "<tokens>:<bank>".
local function split_credit(ctx, i, texts)
  local b, total = ctx.buckets[i], ctx.tokens[i]
  local own = total - ctx.banked[i]
  if own < 0 then own = 0 elseif own > b.bucket then own = b.bucket end
  local bank = tokens_text(total - own)
  texts[i] = (total > 0 and texts[i] or '0') .. ':' .. bank
  return (tokens_text(own)), bank
end

-- Stores every bucket (tokens as of now) plus the tenant-hash fields already in targs.
-- ctx.texts keeps the tokens as written, for a reply to reuse (formatting costs).
local function write(ctx, keep_ms, targs)
  local buckets, tokens = ctx.buckets, ctx.tokens
  local now_s = ctx.now_s
  local sargs, texts, nt, ns = NONE, {}, #targs, 0
  for i = 1, #buckets do
    local b = buckets[i]
    local text = tokens_text(tokens[i])
    texts[i] = text
    local bank
    if b.bank then text, bank = split_credit(ctx, i, texts) end
    if b.in_tenant then
      targs[nt + 1], targs[nt + 2], targs[nt + 3], targs[nt + 4] = b.field, text, b.clock, now_s
      nt = nt + 4
      if bank then targs[nt + 1], targs[nt + 2], nt = b.bank, bank, nt + 2 end
    else
      if ns == 0 then sargs = {} end
      sargs[ns + 1], sargs[ns + 2], sargs[ns + 3], sargs[ns + 4] = b.field, text, b.clock, now_s
      ns = ns + 4
      if bank then sargs[ns + 1], sargs[ns + 2], ns = b.bank, bank, ns + 2 end
    end
  end
  ctx.texts = texts
  local x = expiry_fields(ctx, keep_ms, targs)
  if #targs > 0 then redis.call('HSET', ctx.tenant_key, unpack(targs)) end
  if x then redis.call('PEXPIREAT', ctx.tenant_key, x) end
  if ns > 0 then redis.call('HSET', ctx.shared_key, unpack(sargs)) end
end

-- Counts one decision for previews (config mode:record): cost admitted, or a denial.
local function record(ctx, amount, suffix)
  local rec = ctx.plan.record
  local second = math.floor(ctx.now / 1000000)
  if second ~= rec.second then
    -- Names kept in the (cached) plan for the second: a busy tenant builds them once.
    rec.second, rec.at_key = second, rec.key .. fmt(math.floor(second / 60))
    rec.at_field = rec.field .. fmt(second % 60)
  end
  local key, field = rec.at_key, rec.at_field
  if suffix ~= '' then field = field .. suffix end
  -- Always a float: a field that holds a fractional cost would refuse HINCRBY (the call
  -- would fail after the counts were written), and a float total cannot overflow.
  local total = tonumber(redis.call('HINCRBYFLOAT', key, field, fmt(amount)))
  -- A new field: (re)arm the expiry, once per field rather than once per decision.
  if total == amount then redis.call('PEXPIRE', key, rec.keep_ms) end
end

-- A counter `field` was just created (its first count, `amount`: 1 unless counts were
-- kept in memory): keep it if fewer than `max` of its kind exist, else move its count to
-- `other` (totals stay exact either way).
local function named_counter(key, field, names, max, other, amount)
  if redis.call('HINCRBY', key, names, 1) > max then
    redis.call('HDEL', key, field)
    redis.call('HINCRBY', key, names, -1)
    redis.call('HINCRBY', key, other, amount or 1)
  end
end

-- Counters kept in memory. A decision's counters are HINCRBYs (6,000+ instructions each,
-- two on the allowed path, five on the denied one: most of what separates a decision from
-- the bare bucket arithmetic). As a Functions library the Lua VM outlives a call, so the
-- counts of a namespace are added up here and written with one HINCRBY per field when the
-- first count kept is a second old (Redis time) or PENDING_MAX decisions were counted,
-- whichever comes first; a read (counters.lua, which every reader in the package calls
-- first) writes them at once. The flush runs inside a decision or read of the same
-- namespace, so it touches only keys of its hash tag (one Cluster slot).
-- What a server that loses its VM loses (restart, FUNCTION FLUSH or a reload of this
-- library, failover to a replica): the counts not yet written, at most PENDING_MAX
-- decisions per namespace, all made within one second. Counters only: buckets, caps and
-- the configuration are written by every call as before. As EVALSHA scripts (no VM state
-- between calls) every count is written at once, as it always was. `in_library` is set by
-- the Functions library's own code (_scripts.py), never by the EVALSHA form.
local in_library = false
local PENDING, pending_namespaces = {}, 0
local PENDING_MAX, PENDING_US, PENDING_NAMESPACES = 100, 1000000, 64
-- Counts are kept per namespace *and configuration revision*: the library's memory is one
-- for the whole server, while key names repeat across its databases (two applications on
-- db 0 and db 1 with the same namespace), and a call cannot ask which database it runs in.
-- A revision is a stamp of the moment its database's configuration last changed
-- (config.lua), so (shared hash, revision) names one database's namespace. A namespace
-- whose configuration never changed has no revision and writes its counts at once;
-- config.lua writes the counts of the revision it replaces before it moves it.
-- An entry no decision has written for STALE_US (its namespace deleted, FLUSHDB) is dropped
-- when the table is full, its counts with it: the bound above, per such namespace.
local STALE_US = 60000000

local function pending_id(shared_key, rev)
  return shared_key .. ' ' .. rev
end

-- Drops pending entries overdue by STALE_US (see above); returns how many are left.
local function drop_stale(now)
  for id, p in pairs(PENDING) do
    if now - p.due > STALE_US then
      PENDING[id], pending_namespaces = nil, pending_namespaces - 1
    end
  end
  return pending_namespaces
end

-- The pending counts of `id` (pending_id's) in the namespace of `shared_key` (a table), or
-- false when counts are written at once (EVALSHA, or too many namespaces have counts
-- pending: bounded memory). `now`: Redis time (us), which dates a new table's flush.
local function pending(id, shared_key, now)
  if not in_library then return false end
  if pending_namespaces >= PENDING_NAMESPACES and drop_stale(now) >= PENDING_NAMESPACES then
    return false
  end
  local p = {shared = shared_key, due = now + PENDING_US, n = 0, ints = {}, floats = {},
             dt = {}, keep = {}}
  PENDING[id], pending_namespaces = p, pending_namespaces + 1
  return p
end

-- Adds `n` to counter `field` of hash `key`, now or in `p` (pending's); `float`: a float
-- counter (HINCRBYFLOAT), whose values are not whole numbers or may pass 2^63.
local function bump(p, key, field, n, float)
  if not p then
    if float then
      redis.call('HINCRBYFLOAT', key, field, fmt(n))
    else
      redis.call('HINCRBY', key, field, n)
    end
    return
  end
  local by_key = float and p.floats or p.ints
  local fields = by_key[key]
  if not fields then fields = {}; by_key[key] = fields end
  fields[field] = (fields[field] or 0) + n
end

-- Writes the counts pending for the namespace of `shared_key` at revision `rev` (the
-- shared hash's `_rev`, read by the caller in the database it runs in), if any; returns
-- how many decisions they counted.
local function flush_counts(shared_key, rev)
  if not rev then return 0 end
  local id = pending_id(shared_key, rev)
  local p = PENDING[id]
  if not p then return 0 end
  PENDING[id], pending_namespaces = nil, pending_namespaces - 1
  -- (Admissions the lean path counted by plan, see lean_plan: added in first.)
  local folds = p.folds
  if folds then
    for i = 1, #folds do folds[i](p) end
  end
  for key, fields in pairs(p.ints) do
    local keep = p.keep[key]
    for field, n in pairs(fields) do
      if redis.call('HINCRBY', key, field, n) == n then
        -- A new field. In the shared hash: a queue's or priority's first count (bounded
        -- names, as admit did per decision). In a tenant hash: the hash may have expired
        -- since the count, and HINCRBY made it again, without an expiry: give it the
        -- retention (NX: a hash that has one keeps it).
        if keep then
          redis.call('PEXPIRE', key, math.ceil(keep), 'NX')
        elseif string.sub(field, 1, 4) == 'a:q:' then
          named_counter(shared_key, field, 'n:aq', MAX_QUEUE_COUNTERS, 'a:q:~', n)
        elseif string.sub(field, 1, 4) == 'a:p:' then
          named_counter(shared_key, field, 'n:ap', MAX_PRIORITY_COUNTERS, 'a:p:~', n)
        end
      end
    end
  end
  for key, fields in pairs(p.floats) do
    for field, x in pairs(fields) do redis.call('HINCRBYFLOAT', key, field, fmt(x)) end
  end
  local denials = p.dt_key
  for tenant, n in pairs(p.dt) do
    if redis.call('ZINCRBY', denials, n, tenant) + 0 == n and
        redis.call('ZCARD', denials) > MAX_TENANT_COUNTERS then
      redis.call('ZREMRANGEBYRANK', denials, 0, MAX_TENANT_COUNTERS / 2 - 1)
    end
  end
  return p.n
end

-- The pending counts a decision adds to (false: write them at once), after writing those
-- that are due. Counts one decision; `keep_ms` is the tenant hash's retention.
local function counts_of(ctx, keep_ms)
  local rev = ctx.rev
  if not rev then return false end
  local shared_key = ctx.shared_key
  local id = pending_id(shared_key, rev)
  local p = PENDING[id]
  if p and (ctx.now >= p.due or p.n >= PENDING_MAX) then
    flush_counts(shared_key, rev)
    p = nil
  end
  if not p then
    p = pending(id, shared_key, ctx.now)
    if not p then return false end
  end
  p.n = p.n + 1
  local keep = p.keep[ctx.tenant_key]
  if not keep or keep < keep_ms then p.keep[ctx.tenant_key] = keep_ms end
  return p
end

-- Takes `cost` from every bucket (shadow buckets only where they had it), counts the
-- admission and writes everything back. `targs` may carry more tenant-hash fields to set.
local function admit(ctx, cost, would_deny, keep_ms, targs)
  local buckets, tokens, ok = ctx.buckets, ctx.tokens, ctx.ok
  for i = 1, #buckets do
    if not buckets[i].shadow or ok[i] then tokens[i] = tokens[i] - cost end
  end
  -- Counted in memory where the library keeps counts (counts_of), else written now.
  local p = counts_of(ctx, keep_ms)
  local tenant_key, shared_key = ctx.tenant_key, ctx.shared_key
  if #would_deny > 0 then
    bump(p, tenant_key, 'n:w', 1)
    bump(p, shared_key, 'n:w', 1)
    local srcs = ctx.would_src
    for i, scope in ipairs(would_deny) do
      -- A tenant scope counts in the tenant's hash, and in the shared one under the
      -- configured scope (tenant:* for every tenant under the default): bounded names.
      if is_tenant_scope(scope) then bump(p, tenant_key, 'w:' .. scope, 1) end
      bump(p, shared_key, 'w:' .. srcs[i], 1)
    end
  end
  local plan = ctx.plan
  if p then
    -- (The first count of a queue or priority is checked against the bound on names when
    -- written: flush_counts.)
    bump(p, tenant_key, 'n:a', 1)
    bump(p, shared_key, plan.aq, 1)
    if plan.ap then bump(p, shared_key, plan.ap, 1) end
  else
    redis.call('HINCRBY', tenant_key, 'n:a', '1')
    if redis.call('HINCRBY', shared_key, plan.aq, '1') == 1 then
      named_counter(shared_key, plan.aq, 'n:aq', MAX_QUEUE_COUNTERS, 'a:q:~')
    end
    if plan.ap and redis.call('HINCRBY', shared_key, plan.ap, '1') == 1 then
      named_counter(shared_key, plan.ap, 'n:ap', MAX_PRIORITY_COUNTERS, 'a:p:~')
    end
  end
  if cost ~= 1 then bump(p, shared_key, 'n:ax', cost - 1, true) end
  if plan.record then record(ctx, cost, '') end
  write(ctx, keep_ms, targs)
end

-- Counts a denial of the tenant in the denials zset (see the top of this file).
local function count_tenant_denial(plan)
  local key = plan.denials
  if redis.call('ZINCRBY', key, 1, plan.tenant) + 0 == 1 and
      redis.call('ZCARD', key) > MAX_TENANT_COUNTERS then
    redis.call('ZREMRANGEBYRANK', key, 0, MAX_TENANT_COUNTERS / 2 - 1)
  end
end

-- Counts a denial (per tenant, per scope, in the wait histogram) without touching a bucket:
-- in the tenant's hash under the scope that denied (tenant:acme), in the shared hash under
-- the configured scope (judge's ctx.src: tenant:* when acme runs under the default).
local function deny(ctx, denied_by, wait_ms, keep_ms)
  local targs = {}
  local x = expiry_fields(ctx, keep_ms, targs)
  if x then
    redis.call('HSET', ctx.tenant_key, unpack(targs))
    redis.call('PEXPIREAT', ctx.tenant_key, x)
  end
  -- Counted in memory where the library keeps counts (counts_of), else written now.
  local p = counts_of(ctx, keep_ms)
  local shared_key = ctx.shared_key
  bump(p, ctx.tenant_key, 'd:' .. denied_by, 1)
  bump(p, shared_key, 'd:' .. (ctx.src or denied_by), 1)
  if p then
    local plan = ctx.plan
    p.dt_key = plan.denials
    p.dt[plan.tenant] = (p.dt[plan.tenant] or 0) + 1
  else
    count_tenant_denial(ctx.plan)
  end
  bump(p, shared_key, wait_bucket(wait_ms), 1)
  -- A float: the total of waits a tenant can make as long as it likes (a huge cost on a
  -- slow bucket) must never overflow a 64-bit integer, or every denial after would fail.
  bump(p, shared_key, 'h:us', math.floor(wait_ms * 1000 + 0.5), true)
  if ctx.plan.record then record(ctx, 1, ' d') end
end

-- The flat reply of a decision (see acquire.lua): remaining tokens as written by
-- admit/credit (already formatted), else formatted here.
local function remaining_text(ctx, i)
  local texts, banked = ctx.texts, ctx.banked
  if banked and banked[i] then
    -- A credit bucket: "<tokens>:<bank>", as written (split_credit) or as loaded.
    if texts then return texts[i] end
    local left = ctx.tokens[i]
    return (left > 0 and tokens_text(left) or '0') .. ':' .. tokens_text(banked[i])
  end
  local left = ctx.tokens[i]
  if not (left > 0) then return '0' end
  return texts and texts[i] or (tokens_text(left))
end

-- The denied_by of a reply: "!<scope>" for a concurrency cap, "~<scope>" for a pause,
-- "<scope>(<window>)" for a window of a scope with several, else the scope (false: none).
local function denied_text(ctx, denied_by)
  if ctx.by_cap then return '!' .. denied_by end
  if ctx.paused then return '~' .. denied_by end
  local b = ctx.bound
  if denied_by and b and b.window then return denied_by .. '(' .. b.window .. ')' end
  return denied_by
end

local function decision_reply(ctx, status, wait_ms, denied_by, would_deny)
  -- Concatenation (one string per bucket) is cheaper here than a table of parts.
  local buckets = ctx.buckets
  local text = status .. ' ' .. wait_ms .. ' ' .. (denied_by or '-')
  for i = 1, #buckets do
    text = text .. ' ' .. buckets[i].name .. ' ' .. remaining_text(ctx, i)
  end
  if #would_deny == 0 then return text .. ' |' end
  return text .. ' | ' .. table.concat(would_deny, ' ')
end

-- Returns `cost` tokens to every bucket (never above its burst).
local function credit(ctx, cost, keep_ms)
  local buckets, tokens = ctx.buckets, ctx.tokens
  for i = 1, #buckets do tokens[i] = math.min(buckets[i].burst, tokens[i] + cost) end
  write(ctx, keep_ms, {})
end

-- Takes a slot of every cap of the plan that had one free (judge_caps) for `holder` until
-- `deadline` (Redis time in us); returns the scopes taken, as text ("" when none).
local function take_slots(ctx, holder, deadline)
  local caps, free, scopes = ctx.plan.caps, ctx.free, {}
  local d = fmt(deadline)
  for i = 1, #caps do
    if free[i] then
      local c = caps[i]
      redis.call('ZADD', c.key, d, holder)
      redis.call('PEXPIRE', c.key, MAX_HOLD_MS)
      scopes[#scopes + 1] = c.scope
    end
  end
  return table.concat(scopes, ' ')
end

local function words(text)
  local out = {}
  for w in string.gmatch(text, '%S+') do out[#out + 1] = w end
  return out
end

-- Parked scheduler tenants waiting for a slot of `scope` are due at once (if still parked).
-- `sched`: the scheduler's key prefixes (KeySpace): `wake` (the waiter sets, + scope) and
-- `parked` (+ lane).
local function wake(sched, scope)
  local waiters = redis.call('SPOP', sched.wake .. scope, WAKE_BATCH)
  for i = 1, #waiters do
    local lane, tenant = string.match(waiters[i], '^(%S+) (%S+)$')
    if lane then redis.call('ZADD', sched.parked .. lane, 'XX', 0, tenant) end
  end
end

-- Gives back `holder`'s slot in each scope (`scopes`: a list). True when at least one was
-- still live (its deadline after `now`, us); a holder already gone or expired is only
-- removed. Releasing twice changes nothing the second time. `sched`: as for wake().
local function release_slots(prefix, holder, scopes, now, sched)
  local released = false
  for _, scope in ipairs(scopes) do
    local key = prefix .. 'c:' .. scope
    local deadline = redis.call('ZSCORE', key, holder)
    if deadline then
      redis.call('ZREM', key, holder)
      if deadline + 0 > now then
        released = true
        -- (Only tenants' own caps park a tenant; queue and global caps stop the lane.)
        if is_tenant_scope(scope) then wake(sched, scope) end
      end
    end
  end
  return released
end

-- Renews `holder`'s slots to `deadline` (us) if every one is still live; otherwise what is
-- left of them is released (the slots were lost) and the reply is false. `list`: the
-- scopes.
local function extend_slots(prefix, holder, list, now, deadline, sched)
  for _, scope in ipairs(list) do
    local d = redis.call('ZSCORE', prefix .. 'c:' .. scope, holder)
    if not d or d + 0 <= now then
      release_slots(prefix, holder, list, now, sched)
      return false
    end
  end
  local d = fmt(deadline)
  for _, scope in ipairs(list) do
    local key = prefix .. 'c:' .. scope
    redis.call('ZADD', key, 'XX', d, holder)
    redis.call('PEXPIRE', key, MAX_HOLD_MS)
  end
  return #list > 0
end

-- Redis TIME in us.
local function now_us()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end

-- A job is in transit until a gate sees it (hint.lua, scheduler.lua "route"): `id` joins the tenant's set, its entry lapsing
-- at `lapse_ms`; entries lapsed by `now` (ms) are dropped, and the set itself goes when its
-- last entry lapses.
-- Bounded, so that jobs that never arrive (a purged broker queue) cost little: an entry
-- lapses within TRANSIT_MAX_MS (a predicted wait may be years on a slow limit), and a set
-- keeps at most TRANSIT_MAX_ENTRIES, the soonest to lapse going first. Past either, a hint
-- counts fewer jobs ahead than there are (it says "sooner"); nothing else reads the set.
local TRANSIT_MAX_MS, TRANSIT_MAX_ENTRIES = 7 * 86400000, 100000
local function in_transit(key, id, now, lapse_ms)
  lapse_ms = math.ceil(math.min(lapse_ms, now + TRANSIT_MAX_MS))
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, lapse_ms, id)
  local over = redis.call('ZCARD', key) - TRANSIT_MAX_ENTRIES
  if over > 0 then redis.call('ZPOPMIN', key, over) end
  if redis.call('PTTL', key) < lapse_ms - now then redis.call('PEXPIREAT', key, lapse_ms) end
end

-- hint.lua's judgement (here, made once with the library rather than on every hint): the
-- wait (us), the binding scope (false: none), whether it is a concurrency cap and the window
-- that binds, for a job of `job_cost` under the buckets `ctx` loaded, behind `ahead` jobs of
-- the tenant and `others` of other tenants (those only under a queue or global bucket).
local function hint_judge(ctx, job_cost, ahead, others)
  local wait, denied_by, by_cap, window = 0, false, false, false
  for i, b in ipairs(ctx.buckets) do
    if not b.shadow then
      -- (A cost above the burst is charged as the whole burst, as the gate does.)
      local charge = math.min(job_cost, b.burst)
      local short = ((b.in_tenant and ahead or ahead + others) + 1) * charge - ctx.tokens[i]
      if short > EPSILON * math.max(1, charge) then
        local need = math.min(short / b.rate, MAX_WAIT_US)
        if need > wait then wait, denied_by, window = need, b.scope, b.window end
      end
    end
  end
  if ctx.plan.caps then
    local status, cap_wait, cap_scope = judge_caps(ctx, 1, 0, false, NONE)
    if status == 0 and ctx.by_cap and (cap_wait > wait or not denied_by) then
      wait, denied_by, by_cap, window = cap_wait, cap_scope, true, false
    end
  end
  if ctx.plan.pauses then
    -- A paused scope: the job starts no sooner than the pause ends.
    local _, pause_wait, pause_scope = judge_pauses(ctx, 1, wait, denied_by, NONE)
    if ctx.paused then wait, denied_by, by_cap, window = pause_wait, pause_scope, false, false end
  end
  return wait, denied_by, by_cap, window
end

-- hint.lua's reply (see there) for what hint_judge found.
local function hint_reply(wait, denied_by, ahead, by_cap, window)
  return (denied_by and '0 ' or '1 ') .. fmt(wait / 1000) .. ' ' .. (denied_by or '-') .. ' ' ..
    ahead .. (by_cap and ' 1' or ' 0') .. (window and ' ' .. window or '')
end

-- The lean path. An `acquire` whose plan uses none of the features above but plain
-- buckets (no shadow, no credit, no windows, no concurrency cap, no recording, no priority
-- bucket, no feature this code does not know) is decided, admitted or denied, by code
-- written for that case alone: the same reads, the same writes, the same counts and the
-- same reply as load / judge / admit / deny / write / decision_reply, for about half their
-- Lua. Anything else goes the general way: a plan the lean path does not know is never
-- lean (lean_known, once per plan); a decision whose cost exceeds a burst, or whose counts
-- cannot be kept in memory, hands its loaded state to judge (the ctx load() would have
-- built). tests/test_lean.py runs the same decisions through both paths and compares
-- replies and stored state.
--
-- Why it is built the way it is (callgrind, docs/benchmarks.md "The lean path"): in
-- Redis's Lua every VM instruction costs about 40 CPU instructions, a table access about
-- 110, a call of a Lua function about 600, an upvalue 25, a global 300. A lean decision is
-- therefore one function per plan, over upvalues that hold the plan's constants and what
-- it last wrote, with a straight line of code per bucket: no loop, no call, no table built
-- per bucket or per call. Lua has no macros, so that code is generated, once per shape of
-- plan (how many buckets in the tenant hash and in the shared hash, at most 2 and 2:
-- LEAN_SOURCE) and compiled with loadstring; the source depends on those two counts alone,
-- never on a name or a number from the configuration, which reach the code as arguments.
-- Admissions are counted per plan and added to the namespace's pending counts when those
-- are written (flush_counts calls the plan's fold). A number the plan wrote last (a
-- bucket's tokens and clock, the expiry) is recognised by its text (Lua strings are
-- interned: the test compares two pointers) rather than parsed again, and tokens that are
-- what they were last time (a bucket that stays full) are not printed again. Only in the
-- Functions library: the EVALSHA form has no plan cached between calls, so it always takes
-- the general path.

-- Keys of a plan (build_plan) and of a bucket (bucket) that the lean path knows. A key
-- not listed here whose value is not false (a feature added later: pauses, a priority
-- bucket...) makes the plan general.
local LEAN_PLAN_KEYS = {tenant = true, denials = true, credit = true, buckets = true, tf = true,
                        sf = true, x_at = true, rev_at = true, refill_ms = true, aq = true,
                        ap = true, record = true, caps = true, lean = true}
local LEAN_BUCKET_KEYS = {scope = true, name = true, src = true, in_tenant = true, field = true,
                          clock = true, at = true, rate = true, burst = true, shadow = true,
                          per = true, limit_rate = true}
-- Estimated bytes of a plan's lean function (as PLAN_BYTES: against the cache budget;
-- measured live: 2.2 KB with one bucket, 2.6 KB with two).
local LEAN_BYTES, LEAN_BUCKET_BYTES = 1900, 400

-- The scopes whose buckets the lean path knows (a priority scope's is not among them).
local function lean_scope(scope)
  return scope == 'global' or string.sub(scope, 1, 7) == 'tenant:' or
         string.sub(scope, 1, 6) == 'queue:'
end

-- The plan's shape (tenant buckets, shared buckets) if the lean path knows the plan (see
-- LEAN_PLAN_KEYS), else false. build_plan puts the tenant buckets first.
local function lean_known(plan)
  for k, v in pairs(plan) do
    if v and not LEAN_PLAN_KEYS[k] then return false end
  end
  if plan.credit or plan.record or plan.caps then return false end
  local buckets, tf, sf = plan.buckets, plan.tf, plan.sf
  local nt, ns = 0, 0
  for i = 1, #buckets do
    local b = buckets[i]
    for k, v in pairs(b) do
      if v and not LEAN_BUCKET_KEYS[k] then return false end
    end
    if b.shadow or b.name ~= b.scope or not lean_scope(b.scope) then return false end
    local fields = b.in_tenant and tf or sf
    if b.in_tenant then
      if ns > 0 or b.at ~= 2 * nt + 1 then return false end
      nt = nt + 1
    elseif b.at ~= 2 * ns + 1 then
      return false
    else
      ns = ns + 1
    end
    if fields[b.at] ~= b.field or fields[b.at + 1] ~= b.clock then return false end
  end
  -- At most 2 and 2; every field read a bucket's, but the expiry and the revision, last.
  if nt > 2 or ns > 2 or #tf ~= 2 * nt + 1 or plan.x_at ~= #tf or tf[#tf] ~= 'x' or
      #sf ~= 2 * ns + 1 or plan.rev_at ~= #sf or sf[#sf] ~= '_rev' then
    return false
  end
  return nt, ns
end

-- The source of the lean path for a shape (lean_source): a function of the library's parts
-- (L) returning a function of one plan's (P) returning that plan's decision function (see
-- lean_plan). In it, `{{...}}` is code repeated for every bucket, `{{T ...}}` for the
-- tenant buckets and `{{S ...}}` for the shared ones, where `#` is the bucket's number
-- (tenant buckets first), `$V` the values read from its hash (tv or sv), `$AT` and `$AT1`
-- where its tokens and clock are in them, and `$MISS` what a tenant bucket that held
-- something else says of the expiry; `<<S ...>>` is code for a plan with shared buckets,
-- `<<N ...>>` for one without, `<<T ...>>` for one with tenant buckets; `@EXPIRY@` the
-- code of LEAN_EXPIRY, `@NAME@` a number. The plan's names, limits and state are upvalues
-- (a Lua function has at most 60: hence literals where the shape or the library fixes the
-- value).
--
-- The expiry (x) of the tenant hash is read only when the plan may not know it. Every
-- writer of x only ever moves it later (expiry_fields), until the hash is deleted or
-- expires, which takes the buckets with it. So when every tenant bucket holds what this
-- plan wrote last (nobody wrote them since, the hash was not deleted), the x it last read
-- or wrote is at most the one stored: enough to keep the expiry where it is. Wherever a
-- decision needs more (the expiry may move, the general path takes over, another writer
-- wrote the buckets), x is read, and read along with the buckets until they hold what this
-- plan wrote again.
local LEAN_SOURCE = [=[
local L = ...
local rcall, sformat, srep = L.rcall, L.sformat, L.srep
local PENDING, pending, flush_counts = L.PENDING, L.pending, L.flush_counts
local bump, expiry_fields, fmt, wait_bucket, mfloor = L.bump, L.expiry_fields, L.fmt,
                                                     L.wait_bucket, L.mfloor
local tokens_text = L.tokens_text

return function(P)
  local plan, tenant_key, shared_key, rev, pid = P.plan, P.tenant_key, P.shared_key, P.rev,
                                                 P.pid
  local refill_ms, limit = plan.refill_ms, P.limit
  local aq, ap, B, heads = plan.aq, plan.ap, plan.buckets, P.heads
  -- Per bucket, what a denial by it counts (as deny: in the tenant hash, in the shared
  -- hash) and names; the denials zset.
  local denials, tenant, dt_key = P.denials, plan.tenant, plan.denials
  {{local rate#, burst#, field#, clock_field#, head# = B[#].rate, B[#].burst, B[#].field,
                                                       B[#].clock, heads[#]
  local text#, num# = nil, 0 / 0  -- (none yet: a missing field reads false; NaN equals none)
  }}
  -- The clock of the plan's last write (that of every bucket it wrote); the expiry (x)
  -- last read or written; whether to read x with the buckets.
  local clock_text, clock = nil, 0
  local x_text, x_num, read_x = false, 0, true
  -- Admissions counted since the namespace's pending counts `p` were made (`na`), added
  -- to them when they are written (fold, called by flush_counts); `kept`: the retention
  -- those counts give the tenant hash.
  local p, na, kept = false, 0, 0

  local function fold(q)
    if q ~= p then return end
    p = false
    if na == 0 then return end
    local ints = q.ints
    local tc, sc = ints[tenant_key], ints[shared_key]
    if not tc then tc = {}; ints[tenant_key] = tc end
    if not sc then sc = {}; ints[shared_key] = sc end
    tc['n:a'] = (tc['n:a'] or 0) + na
    sc[aq] = (sc[aq] or 0) + na
    if ap then sc[ap] = (sc[ap] or 0) + na end
    na = 0
  end

  -- The pending counts to add to (as counts_of: those that are due written first); false
  -- when this namespace's counts are written at once (too many namespaces keep counts).
  local function renew(now, keep_ms)
    local q = PENDING[pid]
    if q and (now >= q.due or q.n >= @PENDING_MAX@) then
      flush_counts(shared_key, rev)
      q = nil
    end
    if not q then
      q = pending(pid, shared_key, now)
      if not q then return false end
    end
    if q ~= p then
      -- (Counts of a `p` dropped as stale are dropped with it, as its other counts.)
      p, na, kept = q, 0, 0
      local folds = q.folds
      if not folds then folds = {}; q.folds = folds end
      folds[#folds + 1] = fold
    end
    if kept < keep_ms then
      local keep = q.keep[tenant_key]
      if not keep or keep < keep_ms then q.keep[tenant_key] = keep_ms end
      kept = keep_ms
    end
    return true
  end

  -- The stored x (ms; 0 when none), read now.
  local function expiry()
    local text = rcall('HGET', tenant_key, 'x')
    if text ~= x_text then x_text, x_num = text, (text or 0) + 0 end
    return x_num
  end

  -- What the general path needs to go on: the ctx load() would have built.
  local function handover(now, now_s, old_x, tokens)
    return false, {tenant_key = tenant_key, shared_key = shared_key, buckets = B,
                   tokens = tokens, now = now, now_s = now_s, old_x = old_x, plan = plan,
                   texts = false, rev = rev}
  end

  return function(tk, sk, cost, keep_ms)
    if tk ~= tenant_key or sk ~= shared_key then return end
    -- The revision (and the shared buckets), as load() reads them.
    <<N if rcall('HGET', sk, '_rev') ~= rev then return end>>
    <<S local sv = rcall('HMGET', sk{{S , field#, clock_field#}}, '_rev')
    if sv[@REV_AT@] ~= rev then return end>>
    local with_x, tv = read_x
    if with_x then
      tv = rcall('HMGET', tk{{T , field#, clock_field#}}, 'x')
    else
      tv = rcall('HMGET', tk{{T , field#, clock_field#}})
    end
    local time = rcall('TIME')
    local usec = time[2]
    if #usec < 6 then usec = srep('0', 6 - #usec) .. usec end
    local now_s = time[1] .. usec
    local now = now_s + 0
    -- Every bucket refilled (as load); `hits`: every tenant bucket held what this plan
    -- wrote last.
    local hits, have, updated, elapsed, refilled = true
    {{local t# = burst#
    have, updated = $V[$AT], $V[$AT1]
    if have == text# and updated == clock_text then
      have, updated = num#, clock
    elseif have and updated then
      have, updated = have + 0, updated + 0$MISS
    else
      have = false$MISS
    end
    if have then
      elapsed = now - updated
      if not (elapsed > 0) then elapsed = 0 end
      refilled = have + elapsed * rate#
      if refilled < t# then t# = refilled end
    end
    }}
    -- The expiry: read, or at most the one stored (when `hits`: see LEAN_SOURCE).
    local old_x = x_num
    if with_x then
      local text = tv[@X_AT@]
      if text ~= x_text then
        old_x = (text or 0) + 0
        x_text, x_num = text, old_x
      end
    elseif not hits then
      old_x = expiry()
    end
    read_x = not hits or @NT@ == 0
    -- Judged (as judge: every bucket must have the cost; a cost above a burst is refused
    -- the general way).
    local slack = cost > 1 and @EPSILON@ * cost or @EPSILON@
    local fits = cost <= limit{{ and cost - t# <= slack}}
    if not fits and cost > limit then
      if not with_x and hits then old_x = expiry() end
      read_x = true
      return handover(now, now_s, old_x, { {{t#, }} })
    end
    -- Counted (as counts_of): in memory.
    if not p or now >= p.due or p.n >= @PENDING_MAX@ or kept < keep_ms then
      if not renew(now, keep_ms) then
        if not with_x and hits then old_x = expiry() end
        read_x = true
        return handover(now, now_s, old_x, { {{t#, }} })
      end
    end
    p.n = p.n + 1
    local now_ms, x, xargs = now / 1000, false, false
    if fits then
      local scale, form, steps, value
      na = na + 1
      if cost ~= 1 then bump(p, sk, 'n:ax', cost - 1, true) end
      -- Taken, and printed (as tokens_text, inline) unless as last time.
      {{t# = t# - cost
      if t# ~= num# then
        if t# % 1 ~= 0 and t# > 0 and t# < 9e12 then
          if t# < 9e6 then
            scale, form = 1e9, '%de-9'
          elseif t# < 9e9 then
            scale, form = 1e6, '%de-6'
          else
            scale, form = 1e3, '%de-3'
          end
          steps = t# * scale
          steps = steps - steps % 1
          value = steps / scale
          if value > t# then steps = steps - 1; value = steps / scale end
          text#, num# = sformat(form, steps), value
        else
          text#, num# = fmt(t#), t#
        end
      end
      }}
      -- Written (as write), the expiry first.
      @EXPIRY@
      if x then
        rcall('HSET', tk{{T , field#, text#, clock_field#, now_s}}, 'x', xargs[2])
        rcall('PEXPIREAT', tk, x)
      <<T else
        rcall('HSET', tk{{T , field#, text#, clock_field#, now_s}})>>
      end
      <<S rcall('HSET', sk{{S , field#, text#, clock_field#, now_s}})>>
      clock_text, clock = now_s, now
      -- The reply (as decision_reply).
      return '1 0 -'{{ .. head# .. (t# > 0 and text# or '0')}} .. ' |'
    end
    -- Denied (as judge and deny): by the bucket that waits longest (the first of equals).
    local wait, by, need = 0, false
    {{if cost - t# > slack then
      need = (cost - t#) / rate#
      if need > @MAX_WAIT_US@ then need = @MAX_WAIT_US@ end
      if need > wait or not by then wait, by = need, # end
    end
    }}
    @EXPIRY@
    if x then
      rcall('HSET', tk, 'x', xargs[2])
      rcall('PEXPIREAT', tk, x)
    end
    -- (As bump's, in memory.)
    local denial, wait_ms, ints, floats, dt = denials[by], wait / 1000, p.ints, p.floats, p.dt
    local tc, sc, fc = ints[tk], ints[sk], floats[sk]
    if not tc then tc = {}; ints[tk] = tc end
    if not sc then sc = {}; ints[sk] = sc end
    if not fc then fc = {}; floats[sk] = fc end
    local field = denial[1]
    tc[field] = (tc[field] or 0) + 1
    field = denial[2]
    sc[field] = (sc[field] or 0) + 1
    p.dt_key, dt[tenant] = dt_key, (dt[tenant] or 0) + 1
    field = wait_bucket(wait_ms)
    sc[field] = (sc[field] or 0) + 1
    fc['h:us'] = (fc['h:us'] or 0) + mfloor(wait_ms * 1000 + 0.5)
    -- The reply (as decision_reply, with what each bucket has now).
    return '0 ' .. fmt(wait_ms) .. ' ' .. denial[3]{{ .. head# .. (t# > 0 and tokens_text(t#) or '0')}} .. ' |'
  end
end
]=]

-- Where LEAN_SOURCE has @EXPIRY@ (as expiry_fields on the tokens as they are then): `x`,
-- and `xargs` (its text at 2), when the expiry moves.
local LEAN_EXPIRY = [=[
if not (old_x <= now_ms + @MAX_EXPIRY_MS@ and now_ms + refill_ms + keep_ms / 2 <= old_x) then
        -- When the tenant buckets are full again (as tenant_full_ms): does x move?
        local need = 0
        {{T if (burst# - t#) / rate# > need then need = (burst# - t#) / rate# end
        }}if need > @MAX_WAIT_US@ then need = @MAX_WAIT_US@ end
        if (now + need) / 1000 + keep_ms / 2 > old_x or not (old_x <= now_ms + @MAX_EXPIRY_MS@) then
          -- (It does, or may: expiry_fields decides, on the stored x.)
          if not with_x and hits then old_x = expiry() end
          xargs = {}
          x = expiry_fields({now = now, old_x = old_x, plan = plan, buckets = B,
                             tokens = { {{t#, }} }}, keep_ms, xargs)
          if x then x_text, x_num = xargs[2], x end
        end
      end]=]

-- The library's constants the lean source has as literals (@NAME@).
local LEAN_LITERALS = {PENDING_MAX = PENDING_MAX, EPSILON = EPSILON, TWO_53 = TWO_53,
                       MAX_EXPIRY_MS = MAX_EXPIRY_MS, MAX_WAIT_US = MAX_WAIT_US}

-- LEAN_SOURCE for `nt` tenant buckets and `ns` shared ones.
local function lean_source(nt, ns)
  local function each(first, last, body)
    local out = {}
    for i = first, last do
      local tenant, j = i <= nt, i <= nt and i or i - nt
      local text = string.gsub(body, '%$AT1', tostring(2 * j))
      text = string.gsub(text, '%$AT', tostring(2 * j - 1))
      text = string.gsub(text, '%$V', tenant and 'tv' or 'sv')
      text = string.gsub(text, '%$MISS', tenant and '; hits = false' or '')
      out[#out + 1] = string.gsub(text, '#', tostring(i))
    end
    return table.concat(out)
  end
  local src = string.gsub(LEAN_SOURCE, '@EXPIRY@', function() return LEAN_EXPIRY end)
  src = string.gsub(src, '{{T (.-)}}', function(body) return each(1, nt, body) end)
  src = string.gsub(src, '{{S (.-)}}', function(body) return each(nt + 1, nt + ns, body) end)
  src = string.gsub(src, '{{(.-)}}', function(body) return each(1, nt + ns, body) end)
  src = string.gsub(src, '<<(%u) (.-)>>', function(kind, body)
    local keep = kind == 'T' and nt > 0 or kind == 'S' and ns > 0 or kind == 'N' and ns == 0
    return keep and body or ''
  end)
  local literals = {X_AT = 2 * nt + 1, REV_AT = 2 * ns + 1, NT = nt}
  for name, value in pairs(LEAN_LITERALS) do literals[name] = value end
  return (string.gsub(src, '@(%u[%u%d_]*)@', function(name)
    return string.format('%.17g', literals[name])
  end))
end

-- Compiled lean sources, by shape; false where this server cannot compile them.
local LEAN_SHAPES = {}

-- The lean path's plan maker for a shape (compiled the first time), or false.
local function lean_maker(nt, ns)
  local shape = nt * 3 + ns
  local maker = LEAN_SHAPES[shape]
  if maker == nil then
    maker = false
    local chunk = type(loadstring) == 'function' and loadstring(lean_source(nt, ns), '=lean')
    if chunk then
      maker = chunk({rcall = redis.call, sformat = string.format,
                     srep = string.rep, PENDING = PENDING, pending = pending,
                     flush_counts = flush_counts, bump = bump, expiry_fields = expiry_fields,
                     fmt = fmt, wait_bucket = wait_bucket, mfloor = math.floor,
                     tokens_text = tokens_text})
    end
    LEAN_SHAPES[shape] = maker
  end
  return maker
end

-- The lean path of `plan` (cached in config `c`, first decided on with these keys): a
-- function of (tenant key, shared key, cost, retention) that returns the reply of an
-- admission, or nothing (other keys, or the configuration moved: load() from scratch),
-- or false and the ctx load() would have built (for judge and what follows). False when
-- the plan needs the general path.
local function lean_plan(c, plan, tenant_key, shared_key)
  local rev = c.rev
  if not (in_library and rev) then return false end  -- (counts kept in memory only)
  local nt, ns = lean_known(plan)
  local maker = nt and lean_maker(nt, ns)
  if not maker then return false end
  local buckets, heads, denials, min_burst = plan.buckets, {}, {}, false
  for i = 1, #buckets do
    local b = buckets[i]
    heads[i] = ' ' .. b.scope .. ' '
    denials[i] = {'d:' .. b.scope, 'd:' .. b.src, b.scope}
    if not min_burst or b.burst < min_burst then min_burst = b.burst end
  end
  charge(c, LEAN_BYTES + LEAN_BUCKET_BYTES * #buckets)
  return maker({plan = plan, tenant_key = tenant_key, shared_key = shared_key, rev = rev,
                pid = pending_id(shared_key, rev), heads = heads, denials = denials,
                -- (judge's "cost exceeds a burst", for every bucket at once)
                limit = min_burst and min_burst + EPSILON or math.huge})
end

-- A decision's `acquire` (acquire.lua) on the lean path: its reply when the lean path
-- decided it; else nothing (no lean plan cached: load() from scratch), or false and the
-- ctx load() would have built (the general path decides on it: judge and what follows).
local function lean_acquire(config_key, tenant_key, shared_key, queue, priority, cost, keep_ms)
  local c = CONFIGS[config_key]
  if not c then return end
  local by_tenant = c.plans[tenant_key]
  local by_queue = by_tenant and by_tenant[queue]
  local plan = by_queue and by_queue[priority]
  if not plan then return end
  local decide = plan.lean
  if decide == nil then
    decide = lean_plan(c, plan, tenant_key, shared_key)
    plan.lean = decide
  end
  if decide then return decide(tenant_key, shared_key, cost, keep_ms) end
end

-- What lean.lua reports for a (tenant, queue, priority): "lean", "general" or "none".
local function lean_status(config_key, tenant_key, shared_key, queue, priority)
  local c = CONFIGS[config_key]
  if not c or redis.call('HGET', shared_key, '_rev') ~= c.rev then return 'none' end
  local by_tenant = c.plans[tenant_key]
  local by_queue = by_tenant and by_tenant[queue]
  local plan = by_queue and by_queue[priority]
  if not plan then return 'none' end
  if plan.lean == nil then plan.lean = lean_plan(c, plan, tenant_key, shared_key) end
  return plan.lean and 'lean' or 'general'
end
