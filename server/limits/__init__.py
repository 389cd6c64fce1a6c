"""What any one caller may take: rate limits shared by every worker process."""
