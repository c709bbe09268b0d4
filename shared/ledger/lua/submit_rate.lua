-- A tenant's submit budget: a fixed window that opens at its first submit and lasts window_ms
-- (the key's TTL, so Redis's clock ends it). ARGV: prefix, tenant, limit, window_ms, take
-- ('1': count this submit when allowed; '0': only look). Returns {allowed (1/0), ms until the
-- window frees (0 when allowed)}.
local key = K.submit_rate(ARGV[2])
local limit, window_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local used = tonumber(redis.call('GET', key) or '0')
if used >= limit then
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then -- a counter without its TTL would refuse forever: give it its window
    redis.call('PEXPIRE', key, window_ms)
    ttl = window_ms
  end
  return {0, ttl}
end
if ARGV[5] == '1' and redis.call('INCR', key) == 1 then
  redis.call('PEXPIRE', key, window_ms)
end
return {1, 0}
