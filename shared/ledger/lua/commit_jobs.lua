-- Commit: give a new batch's job records their full TTL, and its tenant a turn for each model it
-- has work for. Run inside the transaction that makes the batch visible, after its job list is
-- pushed: until then each record has only the short TTL it was written with, so a submit killed
-- half way leaves nothing behind for long.
-- ARGV: prefix, batch_id, ttl_s, tenant, model... Returns how many records were found.
-- Uses join_tenant (join_tenant.lua).
local batch_id, ttl, tenant = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local list = K.batch_jobs(batch_id)
local found, start, step = 0, 0, 1000
while true do
  local ids = redis.call('LRANGE', list, start, start + step - 1)
  for _, id in ipairs(ids) do
    found = found + redis.call('EXPIRE', K.job(id), ttl)
  end
  if #ids < step then break end
  start = start + step
end
for i = 5, #ARGV do join_tenant(ARGV[i], tenant) end
return found
