-- config.lua: change one configuration field atomically, bump the version and append an
-- audit entry, so every worker sees the change on its next decision and operators can see
-- who changed what.
--
-- Bucket state is never touched here: deleting a limit and setting it again must not hand
-- out a fresh burst (the bucket simply refills with time, as it would have anyway), and a
-- tenant's bucket may also serve the tenant:* default.
--
-- Every change also sets `_rev` in the shared hash to a stamp no earlier state had (Redis
-- TIME of the change and the version): decisions cache what the configuration says per
-- revision and read `_rev` along with their shared buckets (buckets.lua); `_version` alone
-- could repeat after the hash is deleted and recreated. Writing the config hash in any
-- other way than through this script leaves those caches stale.
--
-- KEYS: config hash, audit stream, shared hash; for "pause" and "resume", the pause index
-- ARGV: op ("set" | "del" | "pause" | "resume"), field, value (for set; for pause: its
--       length in ms), actor, audit length; for "pause", the most pauses that may run at
--       once in the namespace (10000 when left out)
-- Reply: {version, old value or false}; for "del" of an absent field: {-1, false}; for
-- "pause": {version, old value or false, until (ms), now (ms)}, or {-2, false, the bound} for a
-- new pause while as many as the bound run; for "resume" of a scope not paused (or whose
-- pause ran out): {-1, false}
local config_key, audit_key, shared_key = KEYS[1], KEYS[2], KEYS[3]
local op, field, value, actor, audit_len = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

-- Pauses: field pause:<scope> = Redis time (ms) until which nothing of the scope is
-- admitted (buckets.lua reads it into its plans), and the pause index (KEYS[4]: zset scope
-- -> that time) that lets a pause that ran out be forgotten by the next pause or resume,
-- so the config hash holds no more of them than are running. A pause only ever grows: a
-- shorter one (another task's 429 with a smaller Retry-After) leaves the longer as it is.
-- The running pauses are bounded: each is a field of the config hash, which scrapes, the
-- listings, the Celery gate's look for caps and the shard rebalancer read whole (100,000
-- pauses: 8 MB, each read blocking Redis over 100 ms). A pause that ran out does not count
-- (forgotten first); lengthening a running one is always possible.
local MAX_PAUSE_MS = 30 * 86400000
if op == 'pause' or op == 'resume' then
  local index = KEYS[4]
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ran_out = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  for i = 1, #ran_out do
    -- (No new revision: a pause in the past already admits everything.)
    if tonumber(redis.call('HGET', config_key, 'pause:' .. ran_out[i]) or 0) <= now then
      redis.call('HDEL', config_key, 'pause:' .. ran_out[i])
    end
  end
  if #ran_out > 0 then redis.call('ZREMRANGEBYSCORE', index, '-inf', now) end
  local scope = string.sub(field, 7)
  local old = redis.call('HGET', config_key, field)
  local untl
  if op == 'pause' then
    local ms = tonumber(value)
    if not (ms and ms >= 1 and ms <= MAX_PAUSE_MS) then
      return redis.error_reply('queue-ratelimit: a pause must last 1 ms to 30 days, got ' ..
                               string.sub(tostring(value), 1, 40))
    end
    local bound = tonumber(ARGV[6]) or 10000
    if not old and redis.call('ZCARD', index) >= bound then return {-2, false, bound} end
    untl = now + math.ceil(ms)
    if old and tonumber(old) >= untl then
      return {tonumber(redis.call('HGET', config_key, '_version') or 0), old, tonumber(old), now}
    end
    redis.call('HSET', config_key, field, untl)
    redis.call('ZADD', index, untl, scope)
    value = tostring(untl)
  else
    if not old then return {-1, false} end
    redis.call('HDEL', config_key, field)
    redis.call('ZREM', index, scope)
    value = ''
  end
  local version = redis.call('HINCRBY', config_key, '_version', 1)
  redis.call('HSET', shared_key, '_rev', t[1] .. '.' .. t[2] .. ':' .. version)
  redis.call('XADD', audit_key, 'MAXLEN', '~', audit_len, '*',
    'version', version, 'op', op, 'field', field, 'old', old or '', 'new', value,
    'actor', actor, 'at_ms', now)
  return {version, old or false, untl, now}
end

-- A limit's windows keep their state where it was: a window's bucket follows its period,
-- not its place in the list (buckets.lua add_buckets names the fields). Without a record
-- of the layout, changing "10000/d" alone into {"100/s", "10000/d"} would move the daily
-- state out of the scope's own field (now the shortest window's) and start the day full:
-- a day's quota once more. So the new value says where each window's state is when that
-- differs from the default layout: a window of a period the old limit had keeps that
-- window's field; a new period takes the default field if free (inheriting what a limit of
-- another period left there, as changing a single limit always has), else one named by its
-- period. The marks ("@<suffix>" in a window's flags) are only written where needed, so a
-- limit that never had several windows is stored exactly as before.
local function is_limit_field(f)
  return f == 'global' or string.find(f, '^tenant:') ~= nil or string.find(f, '^queue:') ~= nil
    or string.find(f, '^priority:') ~= nil
end

local function limit_windows(v)
  local out = {}
  for w in string.gmatch(v, '[^;]+') do
    local rate, per, burst, flags = string.match(w, '^(%S+) (%S+) (%S+) (%S+)$')
    if not (flags and tonumber(per)) then return nil end
    local tag = string.match(flags, '@([^c]*)')
    local bare = string.gsub(flags, '@[^c]*', '')
    out[#out + 1] = {head = rate .. ' ' .. per .. ' ' .. burst .. ' ', flags = bare,
                     per = tonumber(per), tag = tag}
  end
  return out
end

-- Where each window's state is (a field suffix, '' for the scope's own field): its mark,
-- else the default layout (window_suffix in buckets.lua).
local function window_places(ws)
  local defaults = default_places(ws)
  local out = {}
  for i, w in ipairs(ws) do out[i] = w.tag or defaults[i] end
  return out
end

local function laid_out(old_value, value)
  local new = limit_windows(value)
  if not new then return value end
  local old = old_value and limit_windows(old_value)
  local want, got, taken = default_places(new), {}, {}
  if old then
    local was, used = window_places(old), {}
    for i, w in ipairs(new) do
      for j, o in ipairs(old) do
        if not used[j] and o.per == w.per then
          used[j], got[i] = true, was[j]
          taken[was[j]] = true
          break
        end
      end
    end
  end
  local marked = false
  for i, w in ipairs(new) do
    if not got[i] then
      local place, n = want[i], 1
      if taken[place] then place = 'w' .. fmt(w.per) end
      while taken[place] do
        n = n + 1
        place = 'w' .. fmt(w.per) .. ':' .. n
      end
      got[i] = place
      taken[place] = true
    end
    marked = marked or got[i] ~= want[i]
  end
  local parts = {}
  for i, w in ipairs(new) do
    local flags = w.flags
    if marked then flags = string.sub(flags, 1, 1) .. '@' .. got[i] .. string.sub(flags, 2) end
    parts[i] = w.head .. flags
  end
  return table.concat(parts, ';')
end

local old = redis.call('HGET', config_key, field)
if op == 'set' and is_limit_field(field) then
  -- (A tenant's first limit of its own takes over the state its default left.)
  local was = old
  if not was and string.sub(field, 1, 7) == 'tenant:' then
    local tq = string.find(field, ':queue:', 8, true)
    was = redis.call('HGET', config_key, tq and 'tenant:*' .. string.sub(field, tq) or 'tenant:*')
  end
  value = laid_out(was, value)
end
if op == 'del' then
  if not old then return {-1, false} end
  redis.call('HDEL', config_key, field)
  value = ''
elseif old == value then
  return {tonumber(redis.call('HGET', config_key, '_version') or 0), old}
end
-- Counts kept in memory are kept per revision (buckets.lua): write those of the revision
-- this change ends, while it is still the one this database holds.
flush_counts(shared_key, redis.call('HGET', shared_key, '_rev'))
local version = redis.call('HINCRBY', config_key, '_version', 1)
local t = redis.call('TIME')
if op ~= 'del' then redis.call('HSET', config_key, field, value) end
redis.call('HSET', shared_key, '_rev', t[1] .. '.' .. t[2] .. ':' .. version)
redis.call('XADD', audit_key, 'MAXLEN', '~', audit_len, '*',
  'version', version, 'op', op, 'field', field, 'old', old or '', 'new', value,
  'actor', actor, 'at_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return {version, old}
