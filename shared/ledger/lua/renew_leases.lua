-- A worker's heartbeat for the jobs it renders: renew the leases it still holds (for `lease_s`
-- from Redis's now), write progress, report cancels.
-- ARGV: prefix, worker, lease_s, step, steps, job_id... (step '' = no progress)
-- Returns the ids whose cancel was requested.
local worker, lease_s, step, steps = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local lease_until = now() + lease_s
local cancelled = {}
for i = 6, #ARGV do
  local jk = K.job(ARGV[i])
  local f = redis.call('HMGET', jk, 'state', 'worker', 'cancel_requested')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', K.leases(), 'XX', lease_until, ARGV[i])
    if step ~= '' then redis.call('HSET', jk, 'step', step, 'steps', steps) end
    if f[3] == '1' then cancelled[#cancelled + 1] = ARGV[i] end
  end
end
return cancelled
