-- Farm-wide statistics after a job ended (for /metrics and ETAs), kept apart from TRANSITION so
-- that the compare-and-set stays small. ARGV: prefix, job_id, state, bucket, bucket_ttl_s,
-- histogram_le ('' = no timing), render_s, failure_reason.
local job_id, state, bucket, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local f = redis.call('HMGET', K.job(job_id), 'model', 'worker', 'batch_id')
redis.call('HINCRBY', K.stats('outcomes'), state, 1)
-- Per tenant too (the batch's; a batch from before tenants is the default one's). Tenant names
-- come from the API's configuration, so these hashes stay small.
local tenant = '$DEFAULT_TENANT'
if f[3] then tenant = redis.call('HGET', K.batch(f[3]), 'tenant') or tenant end
redis.call('HINCRBY', K.stats('tenant-' .. state), tenant, 1)
if state == 'succeeded' then
  local names = {model = f[1], worker = f[2]}
  for kind, name in pairs(names) do
    if name then
      local k = K.done_bucket(kind, name, bucket)
      redis.call('INCR', k)
      redis.call('EXPIRE', k, ttl)
    end
  end
  if ARGV[6] ~= '' then
    redis.call('HINCRBY', K.stats('render'), ARGV[6], 1)
    redis.call('HINCRBYFLOAT', K.stats('render'), 'sum', ARGV[7])
    redis.call('HINCRBY', K.stats('render'), 'count', 1)
    redis.call('HINCRBYFLOAT', K.stats('tenant-render-s'), tenant, ARGV[7])
  end
elseif state == 'failed' then
  redis.call('HINCRBY', K.stats('failures'), ARGV[8], 1)
end
return 1
