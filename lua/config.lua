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
--       length in ms), actor, audit length
-- Reply: {version, old value or false}; for "del" of an absent field: {-1, false}; for
-- "pause": {version, old value or false, until (ms), now (ms)}; for "resume" of a scope not paused
-- (or whose pause ran out): {-1, false}
local config_key, audit_key, shared_key = KEYS[1], KEYS[2], KEYS[3]
local op, field, value, actor, audit_len = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

-- Pauses: field pause:<scope> = Redis time (ms) until which nothing of the scope is
-- admitted (buckets.lua reads it into its plans), and the pause index (KEYS[4]: zset scope
-- -> that time) that lets a pause that ran out be forgotten by the next pause or resume,
-- so the config hash holds no more of them than are running. A pause only ever grows: a
-- shorter one (another task's 429 with a smaller Retry-After) leaves the longer as it is.
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

local old = redis.call('HGET', config_key, field)
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
