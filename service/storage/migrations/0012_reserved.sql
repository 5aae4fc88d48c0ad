-- Reserved for the main line's migration 0012 (webhooks, credit notes, refunds), being written
-- beside the branch that added 0013; versions must run 1..n without gaps. Delete this file when
-- that 0012 is merged (two files of version 12 fail migrations.available()).
SELECT 1;
