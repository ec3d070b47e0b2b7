"""The Lua scripts of :class:`~relaygraph.trajectory.redis_store.RedisStore`: each touches
one key, or the two keys of one trajectory (``KEYS[1]``, ``KEYS[2]`` = segments, meta; one
Cluster slot), and runs atomically on the server."""

CREATE = """
if redis.call('HSETNX', KEYS[1], 'task', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'created_at', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('HSET', KEYS[1], 'ttl_ms', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

REFRESH = """
local function refresh()
  local ttl = tonumber(redis.call('HGET', KEYS[2], 'ttl_ms') or '0')
  if ttl and ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
"""

APPEND = REFRESH + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 'missing' end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local length = 0
if #top > 0 then
  length = tonumber(string.match(top[1][1], '-(%d+)$'))
end
local seq = tonumber(ARGV[1])
if seq == length then
  redis.call('XADD', KEYS[1], '0-' .. (seq + 1), 's', ARGV[2])
  refresh()
  return 'ok'
elseif seq < length then
  local have = redis.call('XRANGE', KEYS[1], '0-' .. (seq + 1), '0-' .. (seq + 1))
  if have[1][2][2] == ARGV[2] then return 'dup' end
  return 'taken'
end
return 'gap:' .. length
"""

SET = REFRESH + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
refresh()
return 1
"""

TOUCH = REFRESH + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, ''} end
redis.call('HSET', KEYS[2], 'heartbeat', ARGV[1])
refresh()
return {1, redis.call('HGET', KEYS[2], 'cancel_requested') or ''}
"""

CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local status = redis.call('HGET', KEYS[1], 'status') or 'running'
if status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
return 'running'
"""

CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local status = redis.call('HGET', KEYS[1], 'status') or 'running'
local beat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat') or '0') or 0
if status == 'running' and beat >= tonumber(ARGV[2]) then return 'held' end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[1], 'holder', ARGV[3])
redis.call('HDEL', KEYS[1], 'cancel_requested')
return status
"""
